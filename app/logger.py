"""Weights & Biases as the trainer's logger: offline unless the user asks for online, and one
W&B run per duoflow run, kept across resumes and Slurm requeues."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandb


class WandbLogger(_LightningWandb):
    def __init__(
        self,
        project: str = "duoflow",
        name: str | None = None,
        save_dir: str = "runs",
        id: str | None = None,
        offline: bool | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            project: W&B project.
            name: Run name (the CLI sets it to the run name).
            save_dir: Where W&B keeps its files (the CLI sets it to the run directory).
            id: W&B run id; the CLI reuses the one saved in the run directory when resuming.
            offline: None = offline unless WANDB_MODE=online; `wandb sync <run>/wandb/offline-run-*` uploads later.
            entity: W&B team or user.
            tags: Run tags.
            log_model: Upload checkpoints as W&B artifacts.
        """
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "offline") not in ("online", "run")
        os.makedirs(save_dir, exist_ok=True)
        kwargs.setdefault("resume", "allow")
        super().__init__(project=project, name=name, save_dir=save_dir, id=id, offline=offline, entity=entity,
                         tags=tags, log_model=log_model, **kwargs)
