"""Safe decoding of raw WebDataset samples.

A raw sample maps extensions to bytes: ``{"__key__": "000042", "__url__": "img-000000.tar",
"png": b"...", "cls": b"3"}``. ``decode_sample`` decodes each field by the LAST component of
its extension (``"seg.png"`` decodes as png) through an allow-list; any other extension is
dropped, never decoded. Pickle in every form (``pyd``, ``pickle``, ``pth``, ``pt``) is not on
the list: unpickling a member of a downloaded tar runs arbitrary code. ``npy`` is read with
``allow_pickle=False`` (object arrays are refused). Image formats are pinned so that PIL never
hands a member to an external program (EPS -> Ghostscript).

Any failure becomes ``BadSample("<shard>:<key>: <ext>: <reason>")``, which the pipeline
counts, logs and skips.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import safetensors.numpy
import soundfile
from PIL import Image

MAX_IMAGE_PIXELS: int = 64 * 2**20
"""Decompression-bomb guard: images with more pixels are refused from the header, before decoding."""

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")


class BadSample(Exception):
    """A sample that must be skipped; the message names the shard, key and what is wrong."""


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (H, W, 3) uint8 RGB, refusing more than MAX_IMAGE_PIXELS."""
    with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:  # reads the header only
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadSample(f"{width}x{height} image exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_cls(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def decode_txt(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """WAV/FLAC bytes -> ((T, C) float32, sample_rate)."""
    audio, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio, int(sample_rate)


def decode_safetensors(data: bytes) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(bytes(data))


DECODERS: dict[str, Callable[[bytes], Any]] = {
    **{ext: decode_image for ext in IMAGE_EXTENSIONS},
    "npy": decode_npy,
    "cls": decode_cls,
    "txt": decode_txt,
    "json": decode_json,
    "wav": decode_audio,
    "flac": decode_audio,
    "safetensors": decode_safetensors,
}
"""The allow-list: last extension component -> decoder. Nothing else is ever decoded."""


def decode_sample(sample: dict) -> dict:
    """Decode a raw sample by extension; drop fields not on the allow-list; raise BadSample on errors."""
    shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    decoded = {}
    for field, value in sample.items():
        if field.startswith("__"):  # __key__, __url__, __local_path__
            decoded[field] = value
            continue
        decoder = DECODERS.get(field.rsplit(".", 1)[-1].lower())
        if decoder is None:
            continue
        try:
            decoded[field] = decoder(value)
        except Exception as exn:  # noqa: BLE001 - every decode failure is a bad sample
            reason = str(exn) or type(exn).__name__
            raise BadSample(f"{shard}:{key}: {field}: {reason}") from exn
    return decoded
