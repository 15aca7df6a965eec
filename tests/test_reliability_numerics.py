"""Non-finite numerics: a NaN loss or gradient skips the step on every rank (no optimizer or EMA
update), is counted, and K in a row stop training with the last good weights saved; gradient
clipping clips. The DDP case runs two real gloo processes with the NaN on rank 1 only."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from callbacks.ema import EMA
from callbacks.guards import NonFiniteGuard
from datamodules.shards import ShardDataModule
from datamodules.synthetic import write_synthetic
from models.backbone import MMDiTConfig
from models.conditioning import ClassLabel
from models.generators import ImageFlow, OptimConfig
from models.tokenizers.image import ImagePatches
from tests.conftest import ROOT


def _nan_grad(x: torch.Tensor) -> torch.Tensor:
    """0, whose backward writes NaN into the gradient of `x`."""

    class _F(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.shape = x.shape
            return x.new_zeros(())

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return torch.full(ctx.shape, math.nan)

    return _F.apply(x)


class FaultyFlow(ImageFlow):
    """Test-only: batches listed in `nan_loss` get a NaN loss (gradients stay finite), those in
    `nan_grad` a NaN gradient (loss stays finite); only on `rank` when given."""

    def __init__(self, nan_loss: tuple[int, ...] = (), nan_grad: tuple[int, ...] = (), rank: int | None = None,
                 nan_from: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.nan_loss, self.nan_grad, self.rank, self.nan_from = set(nan_loss), set(nan_grad), rank, nan_from
        self.batches = 0
        self.noise_seeds: list[int] = []

    def loss(self, batch: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().loss(batch, *args, **kwargs)
        if args and self.training:
            self.noise_seeds.append(args[0].initial_seed())  # the seed of this batch's t, noise and dropout
        i, self.batches = self.batches, self.batches + 1
        if self.rank is not None and self.global_rank != self.rank:
            return loss
        if i in self.nan_loss or (self.nan_from is not None and i >= self.nan_from):
            loss = loss + math.nan  # a constant: the gradients stay finite, only the loss is NaN
        if i in self.nan_grad:
            loss = loss + _nan_grad(self.x_out[0].weight)
        return loss


def tiny(**kwargs: Any) -> FaultyFlow:
    return FaultyFlow(tokenizer=ImagePatches(size=16, patch=4),
                      backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1, rope_axes=2),
                      optim=OptimConfig(lr=1e-2), **{"conditioning": ClassLabel(4), **kwargs})


class Snapshots(L.Callback):
    """Parameters, EMA average and optimizer step count after every batch."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor]] = []
        self.applied: list[bool] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        self.ema.append({k: v.clone() for k, v in ema.shadow.items()})
        self.applied.append(pl_module.last_step_applied)


def trainer(tmp_path: Path, max_steps: int, *callbacks: L.Callback, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=list(callbacks), **kwargs)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["nan_loss", "nan_grad"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path, image_shards: Path, fault: str) -> None:
    model = tiny(**{fault: (2,)})
    snaps = Snapshots()
    t = trainer(tmp_path, 4, EMA(decay=0.9), snaps)
    t.fit(model, ShardDataModule(str(image_shards), batch_size=8, num_workers=0))
    assert snaps.applied == [True, True, False, True, True]  # 5 batches for 4 optimizer steps
    assert same(snaps.params[2], snaps.params[1])  # no optimizer update
    assert same(snaps.ema[2], snaps.ema[1])  # no EMA update
    assert not same(snaps.params[3], snaps.params[2])  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert t.global_step == 4 and model.nonfinite_total == 1 and model.nonfinite_streak == 0
    assert t.optimizers[0].state[next(model.parameters())]["step"] == 4
    assert t.callback_metrics["train/skipped_steps"] == 1


def test_k_nonfinite_in_a_row_stop_with_last_good_checkpoint(tmp_path: Path, image_shards: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    model = tiny(nan_from=3)
    snaps = Snapshots()
    # skipped steps do not count towards max_steps: without the guard only max_epochs would end this run
    t = trainer(tmp_path, 50, EMA(decay=0.9), snaps, NonFiniteGuard(max_consecutive=4), max_epochs=2)
    with caplog.at_level(logging.ERROR, logger="duoflow.guards"):
        t.fit(model, ShardDataModule(str(image_shards), batch_size=8, num_workers=0))
    assert snaps.applied == [True] * 3 + [False] * 4  # stopped right after the 4th skip, long before max_steps
    assert t.global_step == 3 and t.should_stop
    assert "stopping: 4 non-finite losses/gradients in a row at step 3" in caplog.text
    good = torch.load(tmp_path / "checkpoints/last-good.ckpt", map_location="cpu", weights_only=False)
    assert good["global_step"] == 3
    assert same({k: v for k, v in good["state_dict"].items() if k in snaps.params[2]}, snaps.params[2])
    assert same(good["ema_state_dict"], snaps.ema[2])


def test_gradient_clipping_clips(tmp_path: Path, image_shards: Path) -> None:
    class GradNorm(L.Callback):
        norms: list[float] = []

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    norms = {}
    for clip in (0.0, 1e-3):
        cb = GradNorm()
        cb.norms = []
        model = tiny()
        model.optim = OptimConfig(lr=1e-2, grad_clip=clip)
        trainer(tmp_path, 3, cb).fit(model, ShardDataModule(str(image_shards), batch_size=8, num_workers=0))
        norms[clip] = cb.norms
    assert len(norms[1e-3]) == 3 and min(norms[0.0]) > 1e-2  # unclipped gradients are far above the limit
    assert max(norms[1e-3]) <= 1e-3 * (1 + 1e-4)


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {root!r})
from callbacks.ema import EMA
from datamodules.shards import ShardDataModule
from tests.test_reliability_numerics import Snapshots, tiny

class Batches(L.Callback):
    keys = []
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(list(batch["__key__"]))

if __name__ == "__main__":
    torch.manual_seed(0)
    model = tiny(nan_loss=(3,), rank=1)  # rank 1 alone sees a NaN loss at its 4th batch
    snaps, batches = Snapshots(), Batches()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=9, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EMA(decay=0.9), snaps, batches], default_root_dir={out!r})
    # 45 samples in 3 shards (20, 20, 5): fewer shards than 2 ranks x 2 workers, unequal sizes
    data = ShardDataModule({shards!r}, batch_size=4, num_workers=2, shuffle_buffer=8)
    trainer.fit(model, data)
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    torch.save({{"params": dict(model.named_parameters()), "ema": ema.shadow, "applied": snaps.applied,
                "keys": batches.keys, "step": trainer.global_step, "skipped": model.nonfinite_total,
                "epochs": trainer.current_epoch, "noise_seeds": model.noise_seeds, "noise_base": model.noise_seed}},
               f"{out}/rank{{trainer.global_rank}}.pt")
"""


def test_ddp_nan_on_one_rank_skips_on_all(tmp_path: Path) -> None:
    """2 gloo ranks, unequal shards: the skip is collective, parameters stay identical, nothing hangs,
    and each rank draws its own training noise."""
    shards = tmp_path / "shards"
    write_synthetic("image", str(shards), num=45, shard_size=20, seed=0, image_size=16, progress=False)
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path), shards=str(shards)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    expected = [True] * 3 + [False] + [True] * 6  # 10 batches for 9 steps, on BOTH ranks
    assert r0["applied"] == r1["applied"] == expected
    assert r0["skipped"] == r1["skipped"] == 1 and r0["step"] == r1["step"] == 9
    assert same(r0["params"], r1["params"]) and same(r0["ema"], r1["ema"])
    # 45 // (4 * 2) = 5 batches per rank per epoch: the first epoch ended on both ranks at the same batch
    assert len(r0["keys"]) == len(r1["keys"]) == 10 and r0["epochs"] == r1["epochs"] == 2
    assert not set(map(tuple, r0["keys"])) & set(map(tuple, r1["keys"]))  # ranks read different data
    # ... and draw different t and noise: one base seed agreed by both, then a seed per (rank, batch)
    assert r0["noise_base"] == r1["noise_base"] and len(r0["noise_seeds"]) == len(r1["noise_seeds"]) == 10
    assert len(set(r0["noise_seeds"]) | set(r1["noise_seeds"])) == 20


def test_weight_decay_groups_spare_norms_biases_and_embeddings() -> None:
    """nanoGPT's groups: only matmul weights decay; the class table (with its null row), biases,
    norm scales and learned tokens keep weight_decay 0, and every parameter is in exactly one group."""
    from models.conditioning import ByteText, ClassLabel
    from models.training import OptimConfig, adamw_with_warmup, decay_groups

    def tiny_generator(conditioning):
        return ImageFlow(tokenizer=ImagePatches(3, 8, 2), conditioning=conditioning,
                         backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1))

    model = tiny_generator(conditioning=ClassLabel(num_classes=3))
    decay, no_decay = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed and not decayed & spared and decayed | spared == set(names.values())
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert "cond.table.weight" in spared and any(n.endswith("bias") for n in spared)
    assert any("q_norm" in n for n in spared)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    text = tiny_generator(conditioning=ByteText(max_len=8, layers=1, heads=2))
    spared_text = {n for n, p in text.named_parameters() if id(p) in {id(q) for q in decay_groups(text, 0.1)[1]["params"]}}
    assert {"cond.pos", "cond.embed.weight"} <= spared_text
    assert not any("self_attn.in_proj_weight" in n for n in spared_text)  # attention matmuls decay
    opt = adamw_with_warmup(model, OptimConfig(weight_decay=0.1))["optimizer"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(adamw_with_warmup(model, OptimConfig())["optimizer"].param_groups) == 1  # no decay: one group, as before
