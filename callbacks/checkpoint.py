"""Checkpoints of a run: Lightning's ModelCheckpoint, plus `last.ckpt` written when training ends
(Lightning saves only on its step/epoch schedule, so a run ending between two saves would lose
its last steps)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, every_n_train_steps: int = 500, save_top_k: int = 1, dirpath: str | None = None,
                 save_weights_only: bool = False):
        """
        Args:
            every_n_train_steps: Save every n optimizer steps (and always at the end of training).
            save_top_k: Keep this many step-numbered checkpoints besides last.ckpt (-1 keeps all).
            dirpath: Folder; None = <run dir>/checkpoints.
            save_weights_only: Drop optimizer and loop state (such checkpoints cannot resume a run).
        """
        super().__init__(dirpath=dirpath, filename="step{step:08d}", monitor="step", mode="max", save_last=True,
                         save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
                         auto_insert_metric_name=False, save_weights_only=save_weights_only)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

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
