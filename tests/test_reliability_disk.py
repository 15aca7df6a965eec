"""A full disk while saving: the previous checkpoint stays loadable, the temporary file goes, one warning line
per failed save and training goes on; the final save (or max_failed_saves in a row) failing ends the run with
exit code 5 and one `error:` line (callbacks/checkpoint.py)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from app.__main__ import main
from app.checkpoint_io import AtomicCheckpointIO
from callbacks.checkpoint import CheckpointNotSaved, RunCheckpoint
from callbacks.preemption import Preemption
from datamodules.shards import ShardDataModule
from tests.conftest import ROOT
from tests.test_reliability_checkpoints import Linear
from tests.test_reliability_resume import small_config


class FullDiskAt(AtomicCheckpointIO):
    """Saves fail with ENOSPC at the given steps (the real write path is the subprocess test's)."""

    def __init__(self, steps: set[int]):
        super().__init__()
        self.steps = steps

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if checkpoint["global_step"] in self.steps:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        super().save_checkpoint(checkpoint, path, storage_options)


def train(tmp_path: Path, shards: Path, steps: int, fail: set[int], **kwargs: Any) -> Path:
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, plugins=[FullDiskAt(fail)],
                        callbacks=[RunCheckpoint(every_n_train_steps=2, dirpath=str(ckpt_dir), **kwargs)])
    trainer.fit(Linear(), ShardDataModule(str(shards), batch_size=8, num_workers=0))
    return ckpt_dir


def test_failed_saves_warn_keep_the_older_checkpoints_and_training_goes_on(tmp_path: Path, image_shards: Path,
                                                                           caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="duoflow.checkpoint"):
        ckpt_dir = train(tmp_path, image_shards, steps=9, fail={4, 6}, save_top_k=1)
    lines = [r.getMessage() for r in caplog.records if "checkpoint not saved" in r.getMessage()]
    assert len(lines) == 2  # one line per failed step (its top-k and last.ckpt saves together)
    assert "No space left on device" in lines[0] and "MiB free in" in lines[0] and "step00000004.ckpt" in lines[0]
    assert "last.ckpt (step 2) is kept" in lines[0] and "saves again at step 6" in lines[0]
    # step 8 saved and rotated step 2 out; the rotation never removed a checkpoint for a failed one
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step00000008.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 9


def test_max_failed_saves_in_a_row_stop_training(tmp_path: Path, image_shards: Path) -> None:
    with pytest.raises(CheckpointNotSaved) as err:
        train(tmp_path, image_shards, steps=30, fail=set(range(4, 31)), max_failed_saves=2)
    message = str(err.value)
    assert "\n" not in message and "2 saves in a row failed" in message and "stopping at step 6" in message
    ckpt_dir = tmp_path / "checkpoints"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 2  # the previous one, whole


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process (soft limit, restored after): a write past it fails with EFBIG, as on a full
    disk, since SIGXFSZ (which would kill the process) is ignored meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_fit_with_a_file_size_limit_keeps_the_last_checkpoint_and_exits_4(tmp_path: Path, image_shards: Path,
                                                                          caplog, capsys) -> None:
    """`fit` resumed under a file-size limit below a checkpoint's size (the real write path): a warning for the
    save at step 10, exit 5 and one error line when the final save at step 15 fails, the step-5 checkpoint whole."""
    config = str(small_config(tmp_path, image_shards, "d", recorder=False))
    assert main(["fit", "--config", config, "--trainer.max_steps", "5"]) == 0
    last = tmp_path / "runs/d/checkpoints/last.ckpt"
    with caplog.at_level(logging.WARNING, logger="duoflow.checkpoint"), file_size_limit(last.stat().st_size // 2):
        started = time.perf_counter()
        code = main(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", "15"])
        seconds = time.perf_counter() - started
    stderr = capsys.readouterr().err
    assert code == 5 and "Traceback" not in stderr, stderr[-3000:]
    warnings = [r.getMessage() for r in caplog.records if "checkpoint not saved" in r.getMessage()]
    assert len(warnings) == 1 and "File too large" in warnings[0] and "step00000010.ckpt" in warnings[0], warnings
    assert "last.ckpt (step 5) is kept" in warnings[0]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "final save at step 15 failed" in errors[0] and "(step 5) is kept" in errors[0]
    assert torch.load(last, weights_only=False)["global_step"] == 5  # still whole, still loadable
    assert not list(last.parent.glob(".*.tmp")) and not (last.parent / "step00000010.ckpt").exists()
    print(f"resumed fit with a full disk: exit 5 after {seconds:.1f} s")


def test_a_failed_preemption_save_stops_with_checkpoint_not_saved(tmp_path: Path, image_shards: Path) -> None:
    class Signal(L.Callback):  # SIGTERM arrives at step 3 (the handler only records it)
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                preemption.received = signal.SIGTERM

    preemption, before = Preemption(requeue=False), signal.getsignal(signal.SIGTERM)
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, plugins=[FullDiskAt({3})],
                        callbacks=[Signal(), preemption, RunCheckpoint(every_n_train_steps=2)])
    with pytest.raises(CheckpointNotSaved, match="preemption save at step 3 failed, the job is not requeued"):
        trainer.fit(Linear(), ShardDataModule(str(image_shards), batch_size=8, num_workers=0))
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 2
    # the handlers from before the fit are back (with Preemption's left behind, a pool forked later in this
    # session would ignore terminate() and hang)
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGUSR1) == before_usr1


DDP_SCRIPT = """
import sys, lightning as L
sys.path.insert(0, {root!r})
from callbacks.checkpoint import CHECKPOINT_NOT_SAVED_EXIT, CheckpointNotSaved, RunCheckpoint
from datamodules.shards import ShardDataModule
from tests.conftest import ROOT
from tests.test_reliability_checkpoints import Linear
from tests.test_reliability_disk import FullDiskAt

if __name__ == "__main__":
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=30, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r},
                        plugins=[FullDiskAt(set(range(4, 31)))],
                        callbacks=[RunCheckpoint(every_n_train_steps=2, max_failed_saves=2)])
    try:
        trainer.fit(Linear(), ShardDataModule({shards!r}, batch_size=4, num_workers=0))
    except CheckpointNotSaved as e:
        print(f"rank {{trainer.global_rank}} stopped at step {{trainer.global_step}}: {{e}}", flush=True)
        sys.exit(CHECKPOINT_NOT_SAVED_EXIT)
"""


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_rank_0_cannot_save(tmp_path: Path, image_shards: Path) -> None:
    """2 gloo ranks, only rank 0 writes and its saves fail from step 4: both ranks learn it at the same step and
    stop together with CheckpointNotSaved (no rank left waiting in a collective)."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path), shards=str(image_shards)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    stops = sorted(re.findall(r"rank (\d) stopped at step (\d+)", proc.stdout))  # the ranks' lines may interleave
    assert proc.returncode == 5 and stops == [("0", "6"), ("1", "6")], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.count("checkpoint not saved") == 1  # the warning at step 4, from rank 0 only
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 2
