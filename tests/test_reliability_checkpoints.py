"""Checkpoints: atomic under SIGKILL, keep-last-K rotation, safetensors export round trip."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open

from app.__main__ import main
from app.checkpoint_io import atomic_torch_save
from app.export import load_exported
from app.sample import load_generator
from callbacks.checkpoint import RunCheckpoint
from datamodules.shards import ShardDataModule
from tests.conftest import ROOT, velocity
from tests.test_reliability_resume import small_config

SAVER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from app.checkpoint_io import atomic_torch_save
blob = torch.randn(24 * 2**20)  # 96 MiB: one save takes a while
for i in range(10**6):
    blob[0] = i
    t = time.perf_counter()
    atomic_torch_save({{"i": i, "blob": blob, "sum": blob.sum()}}, {path!r})
    print(i, time.perf_counter() - t, flush=True)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=str(ROOT), path=str(path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        durations = [float(proc.stdout.readline().split()[1]) for _ in range(3)]  # 3 complete saves
        time.sleep(0.5 * min(durations))  # the 4th save is under way: kill in its middle
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["i"] >= 2 and ckpt["blob"][0] == ckpt["i"] and torch.equal(ckpt["blob"].sum(), ckpt["sum"])
    # the killed save left its temporary file; the next save of the same checkpoint removes it
    assert len(list(path.parent.glob(".last.ckpt.*.tmp"))) <= 1
    atomic_torch_save({"i": -1}, path)
    assert not list(path.parent.glob(".*.tmp")) and torch.load(path, weights_only=True) == {"i": -1}


def test_a_save_removes_the_temporaries_of_killed_saves_of_that_file_only(tmp_path: Path) -> None:
    stale, other = tmp_path / ".last.ckpt.k1ll3d.tmp", tmp_path / ".step=10.ckpt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint"), other.write_bytes(b"another file's save")
    atomic_torch_save({"i": 1}, tmp_path / "last.ckpt")
    assert not stale.exists() and other.exists()


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.layer(batch["x"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_keep_last_k_rotation_and_final_last_ckpt(tmp_path: Path, image_shards: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[RunCheckpoint(every_n_train_steps=2, save_top_k=2, dirpath=str(ckpt_dir))])
    trainer.fit(Linear(), ShardDataModule(str(image_shards), batch_size=8, num_workers=0))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step00000006.ckpt", "step00000008.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 9  # saved when training ended
    assert not list(ckpt_dir.glob(".*.tmp"))  # no temporary files left by completed saves


def test_export_safetensors_round_trip(tmp_path: Path, image_shards: Path) -> None:
    config = small_config(tmp_path, image_shards, "x", recorder=False)
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "4", "--trainer.deterministic", "false"]) == 0
    ckpt = tmp_path / "runs/x/checkpoints/last.ckpt"
    out_ema, out_raw = tmp_path / "ema.safetensors", tmp_path / "raw.safetensors"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out_ema)]) == 0
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out_raw), "--no-ema"]) == 0

    with safe_open(str(out_ema), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["duoflow_model"])
    assert config["class_path"] == "models.generators.ImageFlow" and config["init_args"]["backbone"]["dim"] == 32
    assert meta["duoflow_weights"] == "ema" and meta["duoflow_step"] == "4"

    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.1, 0.5, 0.9])
    cond, keep = {"cls": torch.tensor([0, 1, 2])}, torch.zeros(3, dtype=torch.bool)
    for path, ema in ((out_ema, True), (out_raw, False)):
        reference, used_ema = load_generator(ckpt, ema=ema)  # the checkpoint's weights (EMA or raw)
        assert used_ema == ema
        fresh = load_exported(path)  # built from the file's metadata alone, then its weights
        with torch.no_grad():
            assert torch.equal(velocity(fresh, x, t, cond, keep), velocity(reference, x, t, cond, keep))
    raw = load_exported(out_raw)
    ema_model = load_exported(out_ema)
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), ema_model.parameters()))
