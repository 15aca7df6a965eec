"""Write WebDataset tar shards, byte for byte reproducible.

``ShardWriter`` encodes each field by the last component of its extension, writes the members
of a sample sorted by extension with a fixed mtime, uid/gid 0 and mode 0o444, and starts a new
shard every ``maxcount`` samples. A re-run with the same input writes identical bytes. When it
closes, it records the sample count of every shard in ``<out>/index.json``
(``{"shards": {"img-000000.tar": 1000}}``), which ``shards.count_samples`` reads instead of
scanning the tars.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import soundfile
from PIL import Image
from tqdm import tqdm

from datamodules.decoders import IMAGE_EXTENSIONS

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
        audio, sample_rate = value
        soundfile.write(buffer, np.asarray(audio), int(sample_rate), format=_AUDIO_FORMATS[kind])
    elif kind == "safetensors" and isinstance(value, dict):
        return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in value.items()})
    elif isinstance(value, str):
        return value.encode("utf-8")
    else:
        raise ValueError(f"{ext}: cannot encode a {type(value).__name__}; pass bytes or a supported type")
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
    index_path.write_text(json.dumps({"shards": shards}, indent=1, sort_keys=True) + "\n")


def write_classes(out: str, names: list[str]) -> None:
    """``<out>/classes.json``: the class names, index = class id."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / CLASSES_NAME).write_text(json.dumps(list(names), indent=1) + "\n")


def write_image_folder(src: str, out: str, shard_size: int = 1000, prefix: str = "img", progress: bool = True) -> list[str]:
    """Shard an image folder: ``src/<class>/<name>.{png,jpg,jpeg,webp}`` (class ids = the sorted class
    folder names, written to ``<out>/classes.json``) or, without sub-folders, ``src/<name>.*`` (no
    class); optional same-name ``.txt`` captions.

    Images are stored as their original bytes (decoded and checked when read), in a fixed shuffled
    order so that a shard mixes classes; keys are ``00000000``, ``00000001``, ...
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {src!r} does not exist; expected a directory of images or of class sub-folders")
    is_image = lambda path: path.is_file() and path.suffix[1:].lower() in IMAGE_EXTENSIONS  # noqa: E731
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(label, path) for label, name in enumerate(classes) for path in sorted((root / name).iterdir()) if is_image(path)]
    if not classes:
        files = [(-1, path) for path in sorted(root.iterdir()) if is_image(path)]
    if not files:
        raise ValueError(
            f"image folder {src!r} holds no images; expected {src}/[<class>/]<name>.{{{','.join(IMAGE_EXTENSIONS)}}}"
        )
    random.Random(0).shuffle(files)
    if classes:
        write_classes(out, classes)
    with ShardWriter(os.path.join(out, f"{prefix}-%06d.tar"), maxcount=shard_size) as writer:
        for i, (label, path) in enumerate(tqdm(files, desc=f"shards {src}", unit="img", disable=not progress)):
            sample = {"__key__": f"{i:08d}", path.suffix[1:].lower(): path.read_bytes(),
                      "json": {"path": str(path.relative_to(root))}}
            if label >= 0:
                sample["cls"], sample["json"]["class"] = label, classes[label]
            caption = path.with_suffix(".txt")
            if caption.is_file():
                sample["txt"] = caption.read_text(encoding="utf-8").strip()
            writer.write(sample)
    return writer.paths
