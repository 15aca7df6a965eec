"""Stop a run that keeps producing non-finite losses or gradients, keeping the last good state.

The module itself skips each non-finite step (no optimizer or EMA update, decided on all
ranks together); this callback ends training after too many of them in a row, with a
checkpoint of the weights as they were before the trouble began.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from models.training import require_run_state

log = logging.getLogger("duoflow.guards")


class TrainingDiverged(RuntimeError):
    """Raised by the CLI after `fit` returns when a NonFiniteGuard stopped the run, so the process
    exits non-zero (a scheduler or script sees a failed run, not a finished one)."""


class NonFiniteGuard(L.Callback):
    def __init__(self, max_consecutive: int = 20):
        """
        Args:
            max_consecutive: Stop after this many skipped (non-finite) steps in a row.
        """
        self.max_consecutive = max_consecutive
        self.tripped = False
        self.message = ""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        streak = require_run_state(pl_module, "NonFiniteGuard").nonfinite_streak
        if streak < self.max_consecutive or self.tripped:
            return
        self.tripped = True
        path = Path(trainer.default_root_dir) / "checkpoints" / "last-good.ckpt"
        trainer.save_checkpoint(path)
        msg = self.message = (f"stopping: {streak} non-finite losses/gradients in a row at step {trainer.global_step} "
               f"(lower the learning rate or check the data); last good weights saved to {path}")
        log.error(msg)
        trainer.should_stop = True
        pl_module.print(msg)
