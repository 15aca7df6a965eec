"""Write WebDataset tar shards, byte for byte reproducible.

``ShardWriter`` encodes each field by the last component of its extension, writes the members
of a sample sorted by extension with a fixed mtime, uid/gid 0 and mode 0o444, and starts a new
shard every ``maxcount`` samples. A re-run with the same input writes identical bytes. When it
closes, it records the sample count of every shard in ``<out>/index.json``
(``{"shards": {"img-000000.tar": 1000}}``), which ``shards.count_samples`` reads instead of
scanning the tars.

``ingest`` is the loop of every folder command (``shards images|audio|videos|audiovideo|shapes``): the files,
classes, captions and holdout split come from ``datamodules.sources``, workers read the files in a fixed shuffled
order (``datamodules.parallel``), a file that cannot be used is skipped, counted and named, and ``SplitWriter``
writes OUT (or OUT/train and OUT/holdout). An ``Ingester`` holds what depends on the media: how a file is read,
which samples a result gives. ``write_media_folder`` is it for one sample per file (images, audio) or a ``Cut``.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import soundfile
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datamodules.decoders import IMAGE_EXTENSIONS, BadSample, decode_image
from datamodules.media.files import atomic_write_text
from datamodules.parallel import check_workers, ordered_map
from datamodules.sources import MediaFile, Report, Skipped, find_sources, split_folders, split_of

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
CLASSES_NAME = "classes.json"
MTIME = 946684800  # 2000-01-01, fixed so that shards are reproducible
_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC"}


def encode_field(ext: str, value: Any) -> bytes:
    """Encode one field by the last component of its extension; bytes pass through unchanged."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    kind = ext.rsplit(".", 1)[-1].lower()
    buffer = io.BytesIO()
    if kind in _IMAGE_FORMATS and isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3):
            raise ValueError(f"{ext}: expected a uint8 (H, W) or (H, W, 3) array, got {value.dtype} {value.shape}")
        Image.fromarray(value).save(buffer, format=_IMAGE_FORMATS[kind])
    elif kind == "cls" and isinstance(value, (int, np.integer)):
        return str(int(value)).encode("ascii")
    elif kind == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    elif kind == "npy" and isinstance(value, np.ndarray):
        np.save(buffer, value, allow_pickle=False)
    elif kind in _AUDIO_FORMATS and isinstance(value, tuple):
        return encode_audio(*value, kind)
    elif kind == "safetensors" and isinstance(value, dict):
        return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in value.items()})
    elif isinstance(value, str):
        return value.encode("utf-8")
    else:
        raise ValueError(f"{ext}: cannot encode a {type(value).__name__}; pass bytes or a supported type")
    return buffer.getvalue()


def encode_audio(wave: np.ndarray, sample_rate: int, kind: str = "wav") -> bytes:
    """(T,) or (T, C) float in [-1, 1] (clipped there) -> 16-bit PCM ``kind`` (wav, flac) bytes."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(wave, -1.0, 1.0), int(sample_rate), format=_AUDIO_FORMATS[kind], subtype="PCM_16")
    return buffer.getvalue()


class ShardWriter:
    """Write samples into tar shards named ``pattern % index``, ``maxcount`` samples each.

    ``write({"__key__": "00000001", "png": array, "cls": 3, "txt": "a caption"})``; keys must be
    non-empty and hold no "." or "/" (WebDataset splits a member name at the first dot).
    Use as a context manager; ``close()`` returns the written shard paths.
    """

    def __init__(self, pattern: str, maxcount: int = 1000, index: bool = True):
        """index: merge the shard counts into index.json on close (off where another writer owns it)."""
        self.index = index
        if maxcount <= 0:
            raise ValueError(f"ShardWriter: maxcount must be positive, got {maxcount}")
        try:
            pattern % 0
        except TypeError:
            raise ValueError(f"ShardWriter: pattern {pattern!r} needs one integer field such as 'out/shard-%06d.tar'")
        self.pattern = pattern
        self.maxcount = maxcount
        self.paths: list[str] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._keys: set[str] = set()
        Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write(self, sample: dict) -> None:
        key = str(sample.get("__key__", ""))
        if not key or "." in key or "/" in key:
            raise ValueError(f"ShardWriter: bad __key__ {key!r}; expected a non-empty name without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"ShardWriter: duplicate __key__ {key!r}")
        self._keys.add(key)
        members = {ext: encode_field(ext, value) for ext, value in sample.items() if not ext.startswith("__")}
        if not members:
            raise ValueError(f"ShardWriter: sample {key!r} has no fields")
        if self._tar is None or self.counts[-1] >= self.maxcount:
            self._next_shard()
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), MTIME, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self.counts[-1] += 1

    def _next_shard(self) -> None:
        self._finish_shard()
        path = self.pattern % len(self.paths)
        self.paths.append(path)
        self.counts.append(0)
        self._tar = tarfile.open(path + ".partial", mode="w", format=tarfile.PAX_FORMAT)

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.paths[-1] + ".partial", self.paths[-1])
            self._tar = None

    def close(self) -> list[str]:
        self._finish_shard()
        if self.paths and self.index:
            write_index(self.paths, self.counts)
        return list(self.paths)


def write_index(paths: list[str], counts: list[int]) -> None:
    """Merge shard sample counts into ``index.json`` next to the shards (entries of vanished files dropped)."""
    folder = Path(paths[0]).parent
    index_path = folder / INDEX_NAME
    shards = {}
    if index_path.exists():
        shards = json.loads(index_path.read_text()).get("shards", {})
    shards.update({Path(p).name: n for p, n in zip(paths, counts)})
    shards = {name: n for name, n in sorted(shards.items()) if (folder / name).exists()}
    atomic_write_text(index_path, json.dumps({"shards": shards}, indent=1, sort_keys=True) + "\n")  # never torn


def write_classes(out: str, names: list[str]) -> None:
    """``<out>/classes.json``: the class names, index = class id."""
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / CLASSES_NAME, json.dumps(list(names), indent=1) + "\n")


class SplitWriter:
    """One ShardWriter per split folder (``sources.split_folders(out, holdout)``), classes.json in each;
    ``split`` picks a file's."""

    def __init__(self, folders: dict[str, Path], holdout: float, classes: list[str], prefix: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"--shard-size: expected >= 1, got {shard_size}")
        self.holdout = holdout
        for folder in folders.values() if classes else ():
            write_classes(str(folder), classes)
        self.writers = {split: ShardWriter(os.path.join(folder, f"{prefix}-%06d.tar"), maxcount=shard_size)
                        for split, folder in folders.items()}

    def split(self, file: MediaFile) -> str:
        return split_of(file, self.holdout)

    def write(self, split: str, sample: dict) -> None:
        self.writers[split].write(sample)

    def close(self) -> list[str]:
        return [path for writer in self.writers.values() for path in writer.close()]


def labelled(file: MediaFile, classes: list[str], key: str, fields: dict) -> dict:
    """The shard sample of ``fields`` under ``key``; its ``json`` gains the file's path and class, ``cls`` and ``txt`` beside."""
    meta = {"path": file.name, **fields.get("json", {})}
    sample = {"__key__": key, **fields, "json": meta}
    if file.label is not None:
        sample["cls"], meta["class"] = file.label, classes[file.label]
    if file.caption:
        sample["txt"] = file.caption
    return sample


@dataclass
class Cut:
    """What a reader returns for a file that gives several samples (an audio recording cut into clips)."""

    clips: list[tuple[int, dict]]
    """(clip index, fields) per kept clip; the key is ``<file index>-<clip index>``."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Clips of the file not kept, per reason ("silent"): counted in the summary."""


@dataclass(frozen=True)
class Ingester:
    """The parts of a folder command that depend on its media; ``ingest`` is the loop they share."""

    extensions: tuple[str, ...]
    """File name extensions read (no dot, lower case)."""
    noun: str
    """The files, as named in the errors of ``list_media`` ("videos")."""
    read: Callable[[Path, int], Any]
    """(path, position in the shuffled order: the seed of any random draw) -> what ``samples`` takes; raises
    ``Skipped`` (counted under its reason) or anything else ("unreadable"). Runs in the worker processes: picklable."""
    samples: Callable[[MediaFile, Any, Report], list[tuple[str, dict]]]
    """(file, what ``read`` returned, the report for counters of its own) -> [(key, fields)], in write order."""
    nested: bool = False
    """Class folders searched to any depth, files in SRC kept beside them (``list_media``)."""
    nothing: str = "no {unit}s written from {src}"
    """The error when no shard is written (``{unit}``, ``{src}``), before the summary."""


def read_one(task: tuple[Callable[[Path, int], Any], int, Path]) -> tuple[Any, str, str]:
    """Worker: (what ``read`` returned or None, skip reason or "", detail); never raises for a bad file."""
    read, position, path = task
    try:
        if path.stat().st_size == 0:
            raise Skipped("unreadable", "empty file")
        return read(path, position), "", ""
    except Skipped as exn:
        return None, exn.reason, str(exn)
    except Exception as exn:  # noqa: BLE001 - whatever a broken file raises means "unreadable", named and counted
        return None, "unreadable", str(exn).strip() or type(exn).__name__


def ingest(
    kind: Ingester, report: Report, src: str, out: str, captions: str | None = None, holdout: float = 0.0,
    shard_size: int = 1000, prefix: str = "sample", workers: int = 1, progress: bool = True,
) -> Report:
    """Shard the media folder ``src`` into ``out``: the loop of every folder command, ``kind`` its media.

    Files, classes, captions and the holdout split come from ``datamodules.sources``. Files are read in a fixed
    shuffled order (so that a shard mixes classes), by ``workers`` processes whose results are written in that
    order, so the shards are byte-identical for any number of workers. A file ``read`` cannot use is named in a
    warning and counted in ``report`` (its ``files``, ``used``, ``written``, ``skipped`` are filled here);
    ``report.paths`` are the shards. Raises one line when nothing was written.
    """
    folders = split_folders(out, holdout)
    check_workers(workers)
    classes, files = find_sources(src, kind.extensions, kind.noun, captions, kind.nested)
    for folder in folders.values():  # shards of an earlier run would stay beside the new ones, read as data
        if any(folder.glob(f"{prefix}-*.tar")):
            raise ValueError(f"{folder} already holds {prefix}-*.tar shards; write to an empty folder (or remove them)")
    writer = SplitWriter(folders, holdout, classes, prefix, shard_size)
    report.files, report.written = len(files), {split: 0 for split in writer.writers}
    order = list(files)
    random.Random(0).shuffle(order)
    tasks = [(kind.read, position, file.path) for position, file in enumerate(order)]
    started = time.perf_counter()
    try:
        with ordered_map(read_one, tasks, workers) as results:
            bar = tqdm(results, total=len(tasks), desc=f"shards {src}", unit=report.source, disable=not progress)
            for (result, reason, detail), file in zip(bar, order):  # the bar first: it closes when the results end
                if result is None:
                    report.skip(file, reason, detail)
                    continue
                split = writer.split(file)
                samples = kind.samples(file, result, report)
                for key, fields in samples:
                    writer.write(split, labelled(file, classes, key, fields))
                report.written[split] += len(samples)
                report.used += bool(samples)
                if report.unit != report.source:
                    bar.set_postfix({f"{report.unit}s": sum(report.written.values())})
    finally:
        report.paths = writer.close()
    return report.finish(started, kind.nothing.format(unit=report.unit, src=src))


def by_path(read: Callable[[Path], dict | Cut], path: Path, position: int) -> dict | Cut:
    """An ``Ingester.read`` of a reader that draws nothing at random (picklable as ``partial(by_path, read)``)."""
    return read(path)


def media_samples(file: MediaFile, fields: dict | Cut, report: Report) -> list[tuple[str, dict]]:
    """One sample keyed ``<file index>`` (8 digits), or the clips of a ``Cut`` keyed ``<file index>-<clip index>``."""
    if not isinstance(fields, Cut):
        return [(f"{file.index:08d}", fields)]
    for reason, n in fields.dropped.items():
        report.dropped[reason] = report.dropped.get(reason, 0) + n
    return [(f"{file.index:08d}-{clip:04d}", sample) for clip, sample in fields.clips]


def write_media_folder(
    src: str, out: str, read: Callable[[Path], dict | Cut], extensions: tuple[str, ...], unit: str, noun: str,
    captions: str | None = None, holdout: float = 0.0, shard_size: int = 1000, prefix: str = "sample",
    progress: bool = True, source: str | None = None, workers: int = 1,
) -> Report:
    """Shard a folder with one sample per file, or several (``ingest``; layout, captions, holdout: ``datamodules.sources``).

    ``read(path)`` decodes the file once and returns its media fields (and ``json``), or a ``Cut`` of several
    samples (keys ``<file index>-<clip index>``, 8 and 4 digits; ``source`` then names a file in the summary), or
    raises (``Ingester.read``); files are keyed by their position in the sorted file list (8 digits). ``unit``
    names a sample in the summary ("image"), ``noun`` the files in the errors of ``list_media``. The summary is
    logged at the end. ``read`` must be picklable for ``workers`` > 1.
    """
    kind = Ingester(extensions, noun, functools.partial(by_path, read), media_samples)
    report = ingest(kind, Report(unit=unit, source=source or unit), src, out, captions=captions, holdout=holdout,
                    shard_size=shard_size, prefix=prefix, workers=workers, progress=progress)
    log.info("%s", report.summary())
    return report


def read_image(path: Path) -> dict:
    """An image file's original bytes under its extension, after one full decode (``decode_image``: pixel guard)."""
    data = path.read_bytes()
    try:
        height, width = decode_image(data).shape[:2]
    except BadSample as exn:  # the decompression-bomb guard: a readable header, too many pixels
        raise Skipped("too large", str(exn)) from exn
    except UnidentifiedImageError as exn:
        raise ValueError("not a PNG, JPEG or WebP image") from exn
    return {path.suffix[1:].lower(): data, "json": {"width": width, "height": height}}


def write_image_folder(
    src: str, out: str, shard_size: int = 1000, prefix: str = "img", progress: bool = True, captions: str | None = None,
    holdout: float = 0.0, workers: int = 1,
) -> list[str]:
    """Shard an image folder (``src/[<class>/]<name>.{png,jpg,jpeg,webp}``, see ``datamodules.sources``); the shard paths.

    Each image is decoded once here, so that a broken one (empty, truncated, not an image, too many pixels)
    is skipped and named now rather than met in training; the good ones are stored as their original bytes.
    """
    return write_media_folder(src, out, read_image, IMAGE_EXTENSIONS, "image", "images", captions=captions,
                              holdout=holdout, shard_size=shard_size, prefix=prefix, progress=progress,
                              workers=workers).paths
