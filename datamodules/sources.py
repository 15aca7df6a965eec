"""A folder of media files -> the files to shard, with class, caption and split; shared by every ``shards`` folder command.

Layout: ``SRC/<name>.<ext>`` (samples without class) or ``SRC/<class>/<name>.<ext>`` (class ids = the
sorted folder names, written to ``classes.json``; files directly in SRC are then ignored). Names
starting with "." are skipped (macOS ``._x.png`` forks are not media). ``nested`` (meshes): class folders
are searched to any depth and the files directly in SRC are kept beside them, without class.

Captions, first found wins: the ``--captions`` manifest (CSV with a header, or JSON lines; fields
``path`` relative to SRC, ``caption`` (or ``text``), optional ``class``), a ``<name>.txt`` beside the
file, a ``<name>.json`` beside it holding ``{"caption": ...}`` or ``{"text": ...}``. A manifest
``class`` labels the files of a flat folder (class ids = the sorted names it uses; files it gives no
class have no ``cls``); in a folder of class sub-folders it must name the file's own folder.

Held-out split: ``holdout=F`` writes ``OUT/train`` and ``OUT/holdout``, each a complete shard folder
(index.json, classes.json). A file is held out when the first 8 bytes of sha256 of its path relative
to SRC, read as a fraction of 2^64, fall below F: adding files never moves one from a split to the
other, and every sample cut from one file lands in one split. Without it, shards go to OUT.

Files that cannot be used are skipped, counted and named: a warning each with the path, and the
``Report`` summary line at the end, so that a broken file is found at shard time, not in training.
A link with a media extension that leads nowhere (broken, or a loop) is such a file; a folder link
back to SRC or above it (a symlink loop) is no class folder, and is named in a warning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

SPLITS = ("train", "holdout")
SHOWN_PATHS = 5
"""Paths named per skip category in the summary line (all of them are in the warnings)."""


@dataclass
class MediaFile:
    index: int
    """Position in the sorted file list: the start of its samples' keys."""
    path: Path
    name: str
    """Path relative to SRC, with "/" separators: the manifest's ``path``, the ``json`` path, the holdout hash."""
    label: int | None = None
    caption: str | None = None


class Skipped(Exception):
    """A file that gives no sample: ``reason`` is its category in the summary ("too large"), the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def shown(paths: list[str]) -> str:
    """The first SHOWN_PATHS of ``paths``, sorted, then "..." when there are more: how a summary line names files."""
    return ", ".join(sorted(paths)[:SHOWN_PATHS]) + (", ..." if len(paths) > SHOWN_PATHS else "")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Report:
    """What a folder command wrote and skipped; ``summary()`` is the line shown at the end."""

    unit: str = "sample"
    """What one shard sample is ("image", "clip")."""
    source: str = "file"
    """What one source file is; named after the count (``from 3 videos``) when it differs from ``unit``."""
    files: int = 0
    used: int = 0
    """Files that gave at least one sample."""
    written: dict[str, int] = field(default_factory=dict)
    """Samples written per split ("train", "holdout")."""
    skipped: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> paths (relative to SRC) of the files skipped for it."""
    seconds: float = 0.0
    paths: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    """Samples cut from a used file but not kept, per reason ("silent")."""

    def skip(self, file: MediaFile, reason: str, detail: str) -> None:
        log.warning("skipping %s (%s): %s", file.path, reason, detail)
        self.skipped.setdefault(reason, []).append(file.name)

    def finish(self, started: float, nothing: str) -> Report:
        """Record the seconds since ``started``; when no shard was written, raise one line: ``nothing``, then the summary."""
        self.seconds = time.perf_counter() - started
        if not self.paths:
            raise ValueError(f"{nothing}: {self.summary()}")
        return self

    def summary(self) -> str:
        total = sum(self.written.values())
        per_sample = self.unit != self.source
        rate = f"{self.files / self.seconds:.2f} files/s" if self.seconds else ""
        rate += f", {total / self.seconds:.2f} {self.unit}s/s" if self.seconds and per_sample else ""
        splits = " (" + ", ".join(f"{s} {n}" for s, n in self.written.items()) + ")" if len(self.written) > 1 else ""
        origin = f" from {plural(self.used, self.source)}" if per_sample else ""
        line = f"{plural(total, self.unit)}{splits}{origin} in {self.seconds:.2f} s ({rate})"
        parts = [f"{len(paths)} {reason} ({shown(paths)})" for reason, paths in sorted(self.skipped.items())]
        skipped = sum(len(paths) for paths in self.skipped.values())
        line += f"; {skipped} skipped" + (": " + ", ".join(parts) if parts else "")
        return line + "".join(f"; {plural(n, self.unit)} {reason}" for reason, n in sorted(self.dropped.items()))


def list_media(src: str, extensions: tuple[str, ...], noun: str, nested: bool = False) -> tuple[list[str], list[MediaFile]]:
    """(class names, files sorted by path): ``src/<class>/<name>.<ext>`` or ``src/<name>.<ext>``; ``noun`` names them in errors.

    ``nested``: class folders are searched to any depth (ShapeNet's ``<class>/<model>/models/model.obj``) and the
    files directly in SRC are kept beside them, first, without class.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {src!r} does not exist; expected a directory of {noun} or of class sub-folders")

    def is_media(path: Path) -> bool:  # a link leading nowhere is kept: reading it names it as unreadable
        return (path.is_file() or path.is_symlink()) and not path.name.startswith(".") and path.suffix[1:].lower() in extensions

    classes = class_folders(root)
    found = [(None, path) for path in sorted(root.iterdir()) if is_media(path)] if nested or not classes else []
    for label, name in enumerate(classes):
        inside = (root / name).rglob("*") if nested else (root / name).iterdir()
        found += [(label, path) for path in sorted(inside) if is_media(path)]
    if not found:
        raise ValueError(f"folder {src!r} holds no {noun}; expected {src}/[<class>/]<name>.{{{','.join(extensions)}}}")
    return classes, [MediaFile(i, path, path.relative_to(root).as_posix(), label) for i, (label, path) in enumerate(found)]


def class_folders(root: Path) -> list[str]:
    """The sorted names of the sub-folders of ``root``, without hidden ones and links back to ``root`` or above."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and not linked_back(d, root))


def linked_back(folder: Path, root: Path) -> bool:
    """Whether ``folder`` is a link to ``root`` or one of its parents (a symlink loop); named in a warning if so."""
    target, base = Path(os.path.realpath(folder)), Path(os.path.realpath(root))
    if not folder.is_symlink() or not (target == base or target in base.parents):
        return False
    log.warning("skipping %s: a symlink loop (it links back to %s)", folder, target)
    return True


def read_manifest(path: str) -> dict[str, dict]:
    """``--captions`` CSV (header row) or JSONL -> {path relative to SRC: {"caption": str, "class": str | None}}."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--captions {path!r} does not exist; expected a .csv or .jsonl file (path, caption[, class])")
    rows: list[tuple[str, dict]] = []
    if file.suffix.lower() == ".csv":
        with file.open(newline="", encoding="utf-8-sig") as f:
            rows = [(f"row {n}", row) for n, row in enumerate(csv.DictReader(f), start=2)]
    elif file.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as exn:
                    raise ValueError(f"--captions {path}: line {n} is not JSON ({exn.msg}); expected one object per line")
    else:
        raise ValueError(f"--captions {path!r}: expected a .csv or .jsonl file, got {file.suffix or 'no extension'!r}")
    manifest = {}
    for where, row in rows:
        caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not row.get("path") or not isinstance(caption, str):
            raise ValueError(f"--captions {path}: {where} needs 'path' and 'caption' (or 'text'); got {row!r}")
        label = row.get("class") or None
        manifest[PurePosixPath(str(row["path"]).replace("\\", "/")).as_posix()] = {"caption": caption.strip(),
                                                                                    "class": label and str(label)}
    return manifest


def sidecar_caption(path: Path) -> str | None:
    """The caption of ``<name>.txt`` or ``<name>.json`` ({"caption": ...} / {"text": ...}) beside a file, if any."""
    text = path.with_suffix(".txt")
    if text.is_file():
        return text.read_text(encoding="utf-8").strip()
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            value = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            log.warning("ignoring caption file %s: not JSON (%s)", meta, exn)
            return None
        caption = value.get("caption", value.get("text")) if isinstance(value, dict) else None
        return caption.strip() if isinstance(caption, str) else None
    return None


def label_and_caption(root: Path, classes: list[str], files: list[MediaFile], manifest: dict[str, dict]) -> list[str]:
    """Fill each file's caption (and, from a manifest, its class); returns the class names."""
    absolute = {os.path.realpath(root / f.name): f.name for f in files}  # realpath: a symlink loop does not raise
    rows = {absolute.get(os.path.realpath(name), name) if Path(name).is_absolute() else name: row
            for name, row in manifest.items()}
    unmatched = sorted(set(rows) - {f.name for f in files})
    if unmatched:
        log.warning("--captions: %d rows name no file in %s: %s", len(unmatched), root, ", ".join(unmatched[:SHOWN_PATHS]))
    named = {f.name: rows[f.name]["class"] for f in files if f.name in rows and rows[f.name]["class"]}
    if classes:
        for name, label in named.items():
            folder = name.split("/", 1)[0]
            if label != folder:
                raise ValueError(f"--captions: {name} has class {label!r} but lies in the class folder {folder!r}")
    else:
        classes = sorted(set(named.values()))
    for file in files:
        row = rows.get(file.name)
        file.caption = row["caption"] if row else sidecar_caption(file.path)
        if file.name in named and file.label is None:
            file.label = classes.index(named[file.name])
    return classes


def find_sources(src: str, extensions: tuple[str, ...], noun: str, captions: str | None,
                 nested: bool = False) -> tuple[list[str], list[MediaFile]]:
    """(class names, files with label and caption) of a media folder (``list_media``) and an optional ``--captions`` manifest."""
    classes, files = list_media(src, extensions, noun, nested)
    return label_and_caption(Path(src), classes, files, read_manifest(captions) if captions else {}), files


def in_holdout(name: str, fraction: float) -> bool:
    """Whether the file at ``name`` (relative to SRC) is held out: sha256 of the path, as a fraction of 2^64, < fraction."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_of(file: MediaFile, holdout: float) -> str:
    """The split ("train" or "holdout") of ``file`` under a holdout fraction (0: every file trains)."""
    return "holdout" if holdout > 0 and in_holdout(file.name, holdout) else "train"


def split_folders(out: str, holdout: float) -> dict[str, Path]:
    """{"train": OUT} or, with a holdout fraction, {"train": OUT/train, "holdout": OUT/holdout}."""
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout: expected a fraction in [0, 1), got {holdout}")
    return {split: Path(out) / split for split in SPLITS} if holdout > 0 else {"train": Path(out)}
