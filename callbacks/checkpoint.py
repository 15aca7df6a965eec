"""Checkpoints of a run: Lightning's ModelCheckpoint, plus `last.ckpt` written when training ends
(Lightning saves only on its step/epoch schedule, so a run ending between two saves would lose
its last steps).

A save that fails for lack of room (a full disk or quota, a file-size limit) costs no training: the
save writes a temporary file and renames it, so the previous checkpoint stays whole and loadable, the
temporary file is removed, one warning line names the file, the reason and the free bytes, and the
next scheduled save tries again. Checkpoints of the keep-last-K rotation are only deleted after a
newer one is saved. Training stops with `CheckpointNotSaved` (exit code 5) when the save it cannot do
without fails: the final save when training ends (or the preemption save, callbacks/preemption.py),
or `max_failed_saves` saves in a row (the disk is not coming back; the steps since the last good
checkpoint would be lost anyway). Under DDP only rank 0 writes: whether a save failed is decided by all
ranks together (`save_together`), so that every rank goes on, or stops, at the same step.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("duoflow.checkpoint")

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""The errors of a save that lacked room: full disk, quota, file-size limit (RLIMIT_FSIZE)."""
STATE = ("best_k_models", "kth_best_model_path", "kth_value", "best_model_path", "best_model_score", "current_score",
         "last_model_path", "_last_global_step_saved", "_last_checkpoint_saved")
"""ModelCheckpoint's record of what is saved, put back after a failed save."""


CHECKPOINT_NOT_SAVED_EXIT = 5
"""Exit code of a run stopped by CheckpointNotSaved (not 4: slurm/train.sbatch requeues a vanished rank's 4, and a
full disk is not fixed by a requeue)."""


class CheckpointNotSaved(RuntimeError):
    """A checkpoint the run cannot go on without could not be written; the message is one line."""


def no_room(exn: BaseException) -> bool:
    return isinstance(exn, OSError) and exn.errno in NO_ROOM


def save_together(trainer: L.Trainer, save: Callable[[], None]) -> OSError | None:
    """Run a save every rank takes part in; a failure for lack of room on any rank is returned on every rank
    (None: saved everywhere). Any other error is raised."""
    error: OSError | None = None
    try:
        save()
    except OSError as exn:
        if not no_room(exn):
            raise
        error = exn
        trainer.strategy.barrier("Trainer.save_checkpoint")  # the one the failed save skipped: ranks stay in step
    if not trainer.strategy.reduce_boolean_decision(error is not None, all=False):
        return None
    return error or OSError(errno.ENOSPC, "not saved on another rank (no room)")


def failed_save(exn: OSError, folder: str | os.PathLike) -> str:
    """One line: which file, why, and how much room is left where it goes."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"
    except OSError:
        free = f"free space of {folder} unknown"
    return f"checkpoint not saved: {exn.filename or folder}: {exn.strerror} ({free})"


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, every_n_train_steps: int = 500, save_top_k: int = 1, dirpath: str | None = None,
                 save_weights_only: bool = False, max_failed_saves: int = 3):
        """
        Args:
            every_n_train_steps: Save every n optimizer steps (and always at the end of training).
            save_top_k: Keep this many step-numbered checkpoints besides last.ckpt (-1 keeps all).
            dirpath: Folder; None = <run dir>/checkpoints.
            save_weights_only: Drop optimizer and loop state (such checkpoints cannot resume a run).
            max_failed_saves: Stop training (exit code 5) after this many scheduled saves in a row failed for lack
                of room (full disk, quota, file-size limit); fewer are a warning each and training goes on. The
                final save when training ends must succeed.
        """
        if max_failed_saves < 1:
            raise ValueError(f"RunCheckpoint: max_failed_saves must be >= 1, got {max_failed_saves}")
        super().__init__(dirpath=dirpath, filename="step{step:08d}", monitor="step", mode="max", save_last=True,
                         save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
                         auto_insert_metric_name=False, save_weights_only=save_weights_only)
        self.max_failed_saves = max_failed_saves
        self.failed_saves = 0
        """Scheduled saves in a row that failed for lack of room (0 after a good one)."""
        self._failed_step: int | None = None
        self._saved_step: int | None = None
        self._final = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_step = trainer.global_step if trainer.ckpt_path else None  # the checkpoint resumed from

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and (self._last_global_step_saved != trainer.global_step or self.failed_saves):
            self._final = True
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

    # ---- a save that lacks room: the previous checkpoint stays, training goes on or stops --------

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        self._tolerating_no_room(super()._save_topk_checkpoint, trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self._tolerating_no_room(super()._save_last_checkpoint, trainer, monitor_candidates):
            self._saved_step = trainer.global_step

    def _tolerating_no_room(self, save: Any, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> bool:
        """Run one of ModelCheckpoint's saves; True when it saved. When it lacked room (on any rank), put its record
        back (nothing points at a file that is not there, no older checkpoint is rotated out), then warn or stop."""
        before = {name: getattr(self, name) for name in STATE}
        before["best_k_models"] = dict(self.best_k_models)
        error = save_together(trainer, lambda: save(trainer, monitor_candidates))
        if error is not None:
            for name, value in before.items():
                setattr(self, name, value)
            self._failed(trainer, error)
            return False
        if self._failed_step != trainer.global_step:
            self.failed_saves = 0
        return True

    def _failed(self, trainer: L.Trainer, exn: OSError) -> None:
        line = failed_save(exn, self.dirpath or trainer.default_root_dir)
        kept = (f"{self.last_model_path} (step {self._saved_step}) is kept" if self._saved_step is not None
                else "no checkpoint was saved yet")
        if self._final:  # all ranks alike: the failure was decided together
            raise CheckpointNotSaved(f"{line}; the final save at step {trainer.global_step} failed, {kept}") from exn
        if self._failed_step == trainer.global_step or 0 < trainer.max_steps <= trainer.global_step:
            return  # one line per step (its top-k and last.ckpt saves); the last step's: the final save's error
        self._failed_step = trainer.global_step
        self.failed_saves += 1
        if self.failed_saves >= self.max_failed_saves:
            raise CheckpointNotSaved(f"{line}; {self.failed_saves} saves in a row failed (max_failed_saves="
                                     f"{self.max_failed_saves}), stopping at step {trainer.global_step}; {kept}") from exn
        retry = f"step {trainer.global_step + self._every_n_train_steps}" if self._every_n_train_steps else "the next save"
        if trainer.is_global_zero:  # decided together, said once
            log.warning("%s; %s, training goes on and saves again at %s (failure %d in a row; at %d training stops)",
                        line, kept, retry, self.failed_saves, self.max_failed_saves)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores last_model_path only when the stored dirpath equals ours as a string; a run
        saved with a relative dirpath and resumed with an absolute one would otherwise write last-v1.ckpt
        beside a stale last.ckpt. Same folder = same run."""
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.realpath(saved) == os.path.realpath(self.dirpath):

            def here(path: str) -> str:  # a file of that folder, named the way this run names it
                same = path and os.path.realpath(os.path.dirname(path)) == os.path.realpath(saved)
                return os.path.join(self.dirpath, os.path.basename(path)) if same else path

            state_dict = {
                **state_dict, "dirpath": self.dirpath,
                **{k: here(state_dict[k]) for k in ("last_model_path", "best_model_path", "kth_best_model_path")
                   if k in state_dict},
                "best_k_models": {here(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)
