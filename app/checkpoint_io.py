"""Checkpoints that are never half-written: temporary file, fsync, atomic rename (datamodules/media/files.py).

A process killed while saving leaves the previous checkpoint intact and loadable; a save that fails (a full
disk, a file-size limit) removes its temporary file and raises the OSError itself, whose errno says why (torch
reports a failed write as a RuntimeError of its own; callbacks/checkpoint.py decides what a run does then)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.media.files import atomic_write, temporaries
from models.checkpoints import reading_as_data


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `atomic_write` (the file object keeps the OSError of a failed write reachable)."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    try:
        atomic_write(path, write)
    except BaseException as exn:
        cause = write_error(exn)
        if cause is not None and cause is not exn:
            raise OSError(cause.errno, cause.strerror, str(path)) from exn
        raise
    remove_stale_temporaries(path)


def write_error(exn: BaseException) -> OSError | None:
    """The OSError behind a failed save: `exn` itself, or the one torch's writer met (its RuntimeError's context)."""
    seen: BaseException | None = exn
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files an earlier save of `path` left when its process was killed mid-write
    (one writer per checkpoint path, so after our own save completed any other is stale)."""
    stale = temporaries(path)
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves atomically; loads (Lightning's resume path) as data only: weights_only=True, duoflow's
    config types allowed, anything else refused in one line (models/checkpoints.py)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        with reading_as_data(path):
            return super().load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage),
                                           weights_only=True)
