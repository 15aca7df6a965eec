"""Weights & Biases as the trainer's logger: offline unless the user asks for online, and one
W&B run per duoflow run, kept across resumes and Slurm requeues.

An unreachable server never holds training back: online, the logger first tries a TCP connection to
the server (`init_timeout` seconds at most), then gives `wandb.init` the same bound; when either
fails, the run logs offline under the same run id, with one warning line naming the folder that
`wandb sync` uploads later (to that same run, which a resume also continues)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as _LightningWandb
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger("duoflow.logger")


def unreachable(url: str, timeout: float) -> str | None:
    """Why a TCP connection to `url`'s host and port fails within `timeout` seconds (None: it connects)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as exn:  # refused, no route, unknown host, timed out
        return str(exn) or type(exn).__name__
    return None


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
        init_timeout: float = 30.0,
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
            init_timeout: Online: seconds to reach the W&B server when the run starts (once for a connection, once
                for W&B's own start); past them the run logs offline, for a later `wandb sync`.
        """
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "offline") not in ("online", "run")
        os.makedirs(save_dir, exist_ok=True)
        kwargs.setdefault("resume", "allow")
        super().__init__(project=project, name=name, save_dir=save_dir, id=id, offline=offline, entity=entity,
                         tags=tags, log_model=log_model, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # W&B warns about the setting, even when unset
        self.init_timeout = init_timeout

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, started online when the server answers within init_timeout, else offline (one line)."""
        if self._experiment is not None or self._offline:
            return super().experiment
        import wandb

        base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
        started = time.perf_counter()
        reason = unreachable(base_url, self.init_timeout)
        if reason is None:
            settings = self._wandb_init.get("settings") or wandb.Settings()
            settings.init_timeout = self.init_timeout
            self._wandb_init["settings"] = settings
            try:
                return super().experiment
            except (wandb.errors.Error, TimeoutError, ConnectionError) as exn:
                reason = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
                self._experiment = None
                wandb.teardown()  # W&B's service still holds the run id of the attempt: a fresh one for offline
        waited = time.perf_counter() - started
        self._offline, self._log_model = True, False  # offline runs upload no checkpoints
        self._wandb_init["mode"] = "offline"
        run = super().experiment
        folder = Path(run.dir).parent if getattr(run, "dir", None) else Path(self._save_dir or ".") / "wandb"
        log.warning("W&B server %s unreachable after %.1f s (%s): logging offline to %s under run id %s; "
                    "upload later with `wandb sync %s`", base_url, waited, reason, folder, run.id, folder)
        return run
