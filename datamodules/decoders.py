"""Safe decoding of raw WebDataset samples.

A raw sample maps extensions to bytes: ``{"__key__": "000042", "__url__": "img-000000.tar",
"png": b"...", "cls": b"3"}``. ``decode_sample`` decodes each field by the LAST component of
its extension (``"seg.png"`` decodes as png) through an allow-list; any other extension is
dropped, never decoded. Pickle in every form (``pyd``, ``pickle``, ``pth``, ``pt``) is not on
the list: unpickling a member of a downloaded tar runs arbitrary code. ``npy`` is read with
``allow_pickle=False`` (object arrays are refused). Image formats are pinned so that PIL never
hands a member to an external program (EPS -> Ghostscript); ``mp4`` is opened with the MP4
demuxer only (no format probing) and its frame count and size are capped.

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

MAX_VIDEO_FRAMES: int = 2048
"""Clips with more frames are refused (from the header when it says, else while decoding)."""
MAX_VIDEO_PIXELS: int = 2**28
"""Bound on frames * height * width of one clip (768 MiB as uint8 RGB)."""

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")


class BadSample(Exception):
    """A sample that must be skipped; the message names the shard, key and what is wrong."""


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (H, W, 3) uint8 RGB, refusing more than MAX_IMAGE_PIXELS."""
    try:
        opened = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)  # reads the header only
    except Image.DecompressionBombError as exn:  # PIL's own guard (twice its MAX_IMAGE_PIXELS): the same refusal
        raise BadSample(f"image exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} ({exn})") from exn
    with opened as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise BadSample(f"{width}x{height} image exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
        return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


def decode_video(data: bytes) -> np.ndarray:
    """MP4 bytes -> (T, H, W, 3) uint8 RGB of the first video stream; audio streams are ignored.

    Refuses more than MAX_VIDEO_FRAMES frames, frames over MAX_IMAGE_PIXELS and clips over
    MAX_VIDEO_PIXELS, from the header where it says and while decoding where it does not.
    """
    import av  # lazily: only video shards need PyAV

    with av.open(io.BytesIO(data), format="mp4") as container:
        if not container.streams.video:
            raise BadSample("mp4 holds no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height  # from the header
        if width * height > MAX_IMAGE_PIXELS:
            raise BadSample(f"{width}x{height} frames exceed MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
        if stream.frames > MAX_VIDEO_FRAMES:
            raise BadSample(f"{stream.frames} frames exceed MAX_VIDEO_FRAMES={MAX_VIDEO_FRAMES}")
        frames, pixels = [], 0
        for frame in container.decode(stream):
            if frame.width * frame.height > MAX_IMAGE_PIXELS:
                raise BadSample(f"{frame.width}x{frame.height} frame exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
            pixels += frame.width * frame.height
            if len(frames) >= MAX_VIDEO_FRAMES:
                raise BadSample(f"clip exceeds MAX_VIDEO_FRAMES={MAX_VIDEO_FRAMES}")
            if pixels > MAX_VIDEO_PIXELS:
                raise BadSample(f"clip exceeds MAX_VIDEO_PIXELS={MAX_VIDEO_PIXELS}")
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise BadSample("mp4 holds no decodable frames")
    if len({f.shape for f in frames}) > 1:
        raise BadSample("mp4 frames change size mid-stream")
    return np.stack(frames)


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
    "mp4": decode_video,
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
