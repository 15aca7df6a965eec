"""Checkpoints of a run: Lightning's ModelCheckpoint, plus `last.ckpt` written when training ends
(Lightning saves only on its step/epoch schedule, so a run ending between two saves would lose
its last steps)."""

from __future__ import annotations

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
