"""Exponential moving average of the weights: used for sampling and saved in every checkpoint.

The average lives in the checkpoint under `ema_state_dict`, so `app sample` and a resumed run
get it back from the checkpoint file alone. Under FSDP each rank averages its own shards; the
checkpoint holds the gathered full tensors under the unwrapped model's names (callbacks/sharded.py),
so a run resumed on another world size, or without FSDP, reads the same average.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import lightning as L
import torch
from torch import Tensor

from callbacks.sharded import gather_full, shard_full
from models.training import fsdp_root, require_run_state

CKPT_KEY = "ema_state_dict"


class EMA(L.Callback):
    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1):
        """
        Args:
            decay: Weight of the old average per update; 0.999 averages over ~1000 steps.
            warmup: Use min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the init.
            every_n_steps: Update the average every n applied optimizer steps.
        """
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.shadow: dict[str, Tensor] = {}
        self.updates = 0

    @staticmethod
    def tracked(pl_module: L.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self.tracked(pl_module)
        if not self.shadow:
            self.shadow = {n: p.detach().clone().float() for n, p in params.items()}
        else:  # restored from a checkpoint: move to the module's device
            self.shadow = {n: v.to(params[n].device) for n, v in self.shadow.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not require_run_state(pl_module, "EMA").last_step_applied:
            return  # a skipped (non-finite) step leaves the average untouched
        if trainer.global_step % self.every_n_steps:
            return
        d = self.current_decay()
        for n, p in self.tracked(pl_module).items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily put the averaged weights into the module (for sampling and validation)."""
        if not self.shadow:
            yield
            return
        params = self.tracked(pl_module)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        root = fsdp_root(trainer)  # every rank saves (Lightning's FSDP checkpoint is collective), so may gather
        shadow = self.shadow if root is None else gather_full(root, pl_module, self.shadow)
        checkpoint[CKPT_KEY] = {n: v.detach().cpu().clone() for n, v in shadow.items()}
        checkpoint["ema_updates"] = self.updates

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if CKPT_KEY in checkpoint:
            full = {n: v.float() for n, v in checkpoint[CKPT_KEY].items()}
            root = fsdp_root(trainer)  # FSDP restores after wrapping the model: shard the average like it
            self.shadow = full if root is None else {n: v.float() for n, v in shard_full(root, pl_module, full).items()}
            self.updates = int(checkpoint.get("ema_updates", 0))


def find_ema(trainer: L.Trainer) -> EMA | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)


def load_ema_weights(pl_module: L.LightningModule, checkpoint: dict) -> bool:
    """Copy a checkpoint's EMA weights into the module; False when the checkpoint has none."""
    shadow = checkpoint.get(CKPT_KEY)
    if not shadow:
        return False
    with torch.no_grad():
        for n, p in pl_module.named_parameters():
            if n in shadow:
                p.copy_(shadow[n])
    return True
