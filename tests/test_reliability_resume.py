"""Exact mid-epoch resume: a run killed with SIGKILL and resumed from its checkpoint alone continues
with the same samples and the same losses as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from tests.conftest import ROOT

STEPS, EVERY, KILL_AT = 65, 5, 17  # checkpoint at 15 (epoch 1, batch 3 of 12), killed at 17; 50 steps compared after it


class Recorder(L.Callback):
    """Test-only: append each step's keys and loss to $RECORD_PATH (fsynced), SIGKILL self at $KILL_AT_STEP."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = json.dumps({"step": trainer.global_step, "keys": list(batch["__key__"]), "loss": float(loss)})
        with open(os.environ["RECORD_PATH"], "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if trainer.global_step == int(os.environ.get("KILL_AT_STEP", "0")):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint: like a node failure


def small_config(tmp_path: Path, shards: Path, name: str, recorder: bool = True) -> Path:
    """configs/image/tiny.yaml shrunk to CPU-test size, deterministic, checkpoint every EVERY steps."""
    cfg = yaml.safe_load((ROOT / "configs/image/tiny.yaml").read_text())
    cfg["name"], cfg["runs_dir"] = name, str(tmp_path / "runs")
    cfg["trainer"].update(max_steps=STEPS, logger=False, enable_progress_bar=False, deterministic=True,
                          log_every_n_steps=1, accelerator="cpu")
    cfg["trainer"]["callbacks"] = [
        {"class_path": "callbacks.checkpoint.RunCheckpoint", "init_args": {"every_n_train_steps": EVERY}},
        {"class_path": "callbacks.ema.EMA", "init_args": {"decay": 0.9}},
        {"class_path": "callbacks.guards.NonFiniteGuard"},
    ] + ([{"class_path": "tests.test_reliability_resume.Recorder"}] if recorder else [])
    model = cfg["model"]["init_args"]
    model.pop("sampler", None)
    model["tokenizer"]["size"] = 16
    model["backbone"].update(dim=32, heads=2, depth_dual=1, depth_single=1)
    model["optim"]["warmup_steps"] = 5
    cfg["data"].update(train_shards=str(shards / "*.tar"), batch_size=8, num_workers=0, shuffle_buffer=16)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(args: list[str], record: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECORD_PATH": str(record), "KILL_AT_STEP": str(kill_at), "PYTHONPATH": str(ROOT),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return subprocess.run([sys.executable, "-m", "app", "fit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def records(path: Path) -> dict[int, dict]:
    """step -> the LAST record of that step (a resumed run repeats the steps after its checkpoint)."""
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_sigkill_mid_epoch_then_resume_from_checkpoint_alone_is_exact(tmp_path: Path, image_shards: Path) -> None:
    a = fit(["--config", str(small_config(tmp_path, image_shards, "a"))], tmp_path / "a.jsonl")
    assert a.returncode == 0, a.stderr[-3000:]
    b = fit(["--config", str(small_config(tmp_path, image_shards, "b"))], tmp_path / "b.jsonl", kill_at=KILL_AT)
    assert b.returncode == -signal.SIGKILL, b.stderr[-3000:]
    last = tmp_path / "runs/b/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 15 and ckpt["ShardDataModule"] == {
        "epoch": 1, "done": [3], "world_size": 1, "samples": [24], "history": [], "batch_size": 8, "epoch_samples": 96}

    # resume from the checkpoint file alone: no --config (the run's config travels in the checkpoint)
    resumed = fit(["--ckpt_path", str(last)], tmp_path / "b.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    run_a, run_b = records(tmp_path / "a.jsonl"), records(tmp_path / "b.jsonl")
    assert sorted(run_a) == sorted(run_b) == list(range(1, STEPS + 1))
    after = range(16, STEPS + 1)
    assert [run_b[s]["keys"] for s in after] == [run_a[s]["keys"] for s in after]  # the next unseen samples
    assert [run_b[s]["loss"] for s in after] == [run_a[s]["loss"] for s in after]  # bit for bit, the 50 steps after the resume
    final_a = torch.load(tmp_path / "runs/a/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    final_b = torch.load(last, map_location="cpu", weights_only=False)
    assert final_b["global_step"] == STEPS
    for k, v in final_a["state_dict"].items():
        assert torch.equal(v, final_b["state_dict"][k]), k
    for k, v in final_a["ema_state_dict"].items():
        assert torch.equal(v, final_b["ema_state_dict"][k]), k
