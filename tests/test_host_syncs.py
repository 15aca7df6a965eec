"""The training step reads one value on the host per step (the non-finite check), nothing else.

A host read of a device value (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``) makes the CPU wait
for the GPU; one per step is the price of the skip-the-step guard, every other one is a stall. Two
CPU proofs: the loss and its backward run with model and batch on the meta device, where a read
cannot happen at all (it raises); and a real Lightning step on the CPU counts every read. On a GPU,
``torch.cuda.set_sync_debug_mode`` also catches blocking host-to-device copies."""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from datamodules.transforms import collate
from models.backbone import MMDiTConfig
from models.conditioning import ByteText, ClassLabel, Condition, Unconditional
from models.generators import ImageFlow
from models.tokenizers.image import ImagePatches

CONDITIONS = [ClassLabel(3), ByteText(max_len=8, layers=1, heads=2), Unconditional()]


def tiny(conditioning: Condition, **kw: Any) -> ImageFlow:
    torch.manual_seed(0)
    return ImageFlow(tokenizer=ImagePatches(3, 8, 2), conditioning=conditioning, cond_drop=0.5,
                     backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1), **kw)


@pytest.mark.parametrize("packed", [False, True], ids=["regular", "packed"])
@pytest.mark.parametrize("conditioning", CONDITIONS, ids=lambda c: type(c).__name__)
def test_loss_and_backward_read_no_device_value(conditioning: Condition, packed: bool) -> None:
    """Meta tensors have no data: any read of one raises, so a loss + backward that run read nothing."""
    model = tiny(conditioning).to("meta")
    x = ([torch.rand(3, 8, 8), torch.rand(3, 4, 8)] if packed else torch.rand(2, 3, 8, 8))
    batch = {"x": [s.to("meta") for s in x] if packed else x.to("meta"), "cls": torch.tensor([0, 2], device="meta"),
             "txt": ["a red circle", "b"]}
    loss = model.loss(batch, torch.Generator().manual_seed(0))  # half the conditions dropped (cond_drop=0.5)
    loss.backward()
    assert loss.device.type == "meta" and all(p.grad is not None for p in model.backbone.parameters())


class HostReads(TorchDispatchMode):
    """Where a tensor's value is read on the host: ops that need one and `tolist`/`numpy` (no aten op)."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def free(self, t: torch.Tensor) -> bool:
        """Whether reading `t` costs nothing (never, here: every read counts)."""
        return False

    def _record(self, t: torch.Tensor) -> None:
        """The innermost caller outside torch and this file, as "models/training.py:all_finite" (or a
        Lightning function)."""
        if self.free(t):
            return
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
        self.sites.append("/".join(frames[-1].filename.rsplit("/", 2)[-2:]) + f":{frames[-1].name}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in self.OPS or bool_index:
            self._record(args[0])
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> "HostReads":
        self._patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, original in self._patched.items():
            def read(t: torch.Tensor, *a: Any, _original: Any = original, **k: Any) -> Any:
                self._record(t)
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)


class DeviceReads(HostReads):
    """Host reads of values computed from the parameters or the batch: on a GPU each one waits for it.
    Values made on the host (a Python number made a tensor, and what is computed from such values
    alone) are free to read. A CPU-only proof of which reads would stall a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.host = WeakTensorKeyDictionary()

    def free(self, t: torch.Tensor) -> bool:
        return t in self.host

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        host = func.overloadpacket.__name__ == "lift_fresh" or all(t in self.host for t in inputs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and host:
                self.host[t] = True
            elif isinstance(t, torch.Tensor):
                self.host.pop(t, None)  # an in-place op on a host value with a device input
        return out


class CountingFlow(ImageFlow):
    """Records the host reads of each training step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reads: list[list[str]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with HostReads() as reads:
            out = super().training_step(batch, batch_idx)
        self.reads.append(reads.sites)
        return out


def fit(model: L.LightningModule, labels: list[int], steps: int = 2) -> None:
    data = [{"x": torch.rand(3, 8, 8) * 2 - 1, "cls": label, "txt": "a red circle"} for label in labels]
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate))


def test_training_step_reads_one_value_the_nonfinite_check() -> None:
    """Through Lightning, with AdamW (fused: its step counters stay in the kernel) and gradient clipping."""
    torch.manual_seed(0)
    model = CountingFlow(tokenizer=ImagePatches(3, 8, 2), conditioning=ClassLabel(3), cond_drop=0.5,
                         backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1))
    fit(model, [0, 1, 2, 0, 1, 2, 0, 1])
    assert model.reads == [["models/training.py:all_finite"]] * 2  # its one .item() per step, nothing else


def test_bad_class_label_stops_before_the_step() -> None:
    """Checked on the host as the batch moves to the device, in one line, not read back in the step."""
    model = tiny(ClassLabel(3))
    with pytest.raises(ValueError, match=r"class label 5 outside 0\.\.2 \(model\.conditioning\.num_classes\)"):
        fit(model, [0, 1, 5, 2], steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_cuda_training_step_syncs_once() -> None:
    """torch's own sync detector: every stream sync or blocking copy in the step warns; one expected."""
    model = tiny(ClassLabel(3))
    syncs: list[list[str]] = []
    step = model.training_step

    def counted(batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = step(batch, batch_idx)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append([str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)])
        return out

    model.training_step = counted
    fit(model, [0, 1, 2, 0, 1, 2, 0, 1])
    assert [len(s) for s in syncs] == [1, 1], syncs


def image_run() -> tuple[L.LightningModule, list]:
    model = tiny(ClassLabel(3))
    return model, [{"x": torch.rand(3, 8, 8) * 2 - 1, "cls": i % 3, "txt": "a"} for i in range(12)]


def shape_run() -> tuple[L.LightningModule, list]:
    from models.shape_autoencoder import ShapeAutoencoder
    from tests.test_shape import TINY_AE, shape_synthetic_samples

    return ShapeAutoencoder(TINY_AE), shape_synthetic_samples(12, points=32, queries=32)


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
@pytest.mark.parametrize("run", [image_run, shape_run], ids=["image", "shape"])
def test_whole_loop_reads_one_device_value_per_step_with_bar_and_logger(run: Any, bar: str, tmp_path: Any) -> None:
    """Around the step too: Lightning reads every progress-bar value at each batch end and bar refresh,
    and loggers read their values at each log step. The values shown (the loss, the shape autoencoder's
    IoU) come to the host with the non-finite check's one read, so they cost no stall. (The shape
    autoencoder also logs device values that its logger reads every `log_every_n_steps`; the image
    run logs at every step here, all host values.)"""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model, data = run()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                        log_every_n_steps=1 if run is image_run else 50, enable_checkpointing=False,
                        enable_model_summary=False,
                        callbacks=[RichProgressBar() if bar == "rich" else TQDMProgressBar(refresh_rate=1)])
    with DeviceReads() as reads:
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate))
    assert reads.sites == ["models/training.py:all_finite"] * 3
    shown = trainer.progress_bar_metrics["train/loss"]
    assert isinstance(shown, float) and shown == pytest.approx(float(trainer.callback_metrics["train/loss"]))


class SyncWindow(L.Callback):
    """torch's sync detector on from the start of step `first` to the start of step `last`: whole steps,
    with every hook, the progress bar and the logger between them."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.caught: list[str] = []
        self._recorder: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.first:
            torch.cuda.synchronize()
            self._recorder = warnings.catch_warnings(record=True)
            self._log = self._recorder.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.last and self._recorder is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._recorder.__exit__(None, None, None)
            self.caught = [str(w.message)[:120] for w in self._log if "synchroniz" in str(w.message)]
            self._recorder = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_cuda_whole_loop_syncs_once_per_step_with_bar_and_logger(tmp_path: Any) -> None:
    """The CUDA side of the whole-loop test above: steps 2 and 3 with a progress bar and a logger at every
    step, one sync each (the non-finite check); Lightning moves the batch with non_blocking copies."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model, data = image_run()
    window = SyncWindow(first=2, last=4)
    trainer = L.Trainer(max_steps=5, accelerator="gpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[TQDMProgressBar(refresh_rate=1), window])
    trainer.fit(model, torch.utils.data.DataLoader(data * 2, batch_size=4, collate_fn=collate))
    assert len(window.caught) == 2, window.caught
