"""Checkpoints are data, not code: every checkpoint duoflow reads is unpickled with ``weights_only=True``.

torch then rebuilds only tensors, plain Python values and the types allow-listed here: duoflow's
config dataclasses, which a generator built in Python (not through the CLI, whose checkpoints
hold plain dicts) keeps among its hyper-parameters. Unpickling any other global (``os.system``, a
class with a ``__reduce__`` payload, a whole ``nn.Module``) is refused before it runs, and the
refusal is one line naming the type.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpoint(ValueError):
    """A file that is not a checkpoint duoflow can read as data (one line: path and why)."""


def subclasses(base: type) -> list[type]:
    """Every class below ``base`` that has been imported (direct and indirect subclasses)."""
    found = []
    for sub in base.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


def safe_types() -> list[type | tuple[type, str]]:
    """The classes a duoflow checkpoint may hold besides tensors and plain values: the config dataclasses a
    generator built in Python keeps among its hyper-parameters. Found from the config bases (Condition,
    Tokenizer, Sampler, TimestepSampler), so a new one is allowed without editing a list; a (class, name)
    pair names a class that moved since older checkpoints were written."""
    import dataclasses

    import models.tokenizers.audio  # noqa: F401  the modules that define the configs, so their classes exist
    import models.tokenizers.image  # noqa: F401
    import models.tokenizers.shape  # noqa: F401
    import models.tokenizers.video  # noqa: F401
    from models.backbone import MMDiTConfig
    from models.codecs.shape_config import ShapeAEConfig
    from models.conditioning import Condition
    from models.flow import Sampler, TimestepSampler
    from models.text_encoders import TextEncoderSpec
    from models.tokenizers.base import Tokenizer
    from models.training import OptimConfig

    configs = [t for base in (Condition, Tokenizer, Sampler, TimestepSampler) for t in subclasses(base)
               if dataclasses.is_dataclass(t)]
    return [MMDiTConfig, ShapeAEConfig, TextEncoderSpec, OptimConfig, *configs,
            (ShapeAEConfig, "models.codecs.shape.ShapeAEConfig")]


@contextlib.contextmanager
def reading_as_data(path: str | Path) -> Iterator[None]:
    """Within: torch.load(weights_only=True) knows duoflow's config types, and a refused global raises
    UnsafeCheckpoint with one line naming it (also around Lightning's own loads)."""
    try:
        with torch.serialization.safe_globals(safe_types()):
            yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it needs {found.group(1)} to load, which is code, not data" if found else \
            f"torch cannot read it as data ({str(e).splitlines()[0][:120]})"
        raise UnsafeCheckpoint(f"{path}: refused: {what} (duoflow loads checkpoints with weights_only=True)") from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """A checkpoint as data (see the module docstring); one-line errors for missing, foreign or unsafe files."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with reading_as_data(path):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except (RuntimeError, KeyError, EOFError, ValueError) as e:  # not a torch.save file at all
            raise UnsafeCheckpoint(f"{path}: not a checkpoint (torch cannot read it: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:80] if str(e) else 'no detail'})") from None
    if not isinstance(state, dict):
        raise UnsafeCheckpoint(f"{path}: not a checkpoint (it holds a {type(state).__name__}, expected a dict)")
    return state
