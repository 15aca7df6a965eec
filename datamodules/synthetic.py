"""Procedural data for demos and tests: coloured shapes with a class label and a caption.

Everything is numpy + PIL and seeded per sample (``default_rng([seed, i])``), so sample ``i``
does not depend on how many samples are drawn, and a re-run writes identical shards.
Coordinates are fractions of the image side: ``cx, cy`` is the shape centre, ``scale`` its extent.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from datamodules.writers import ShardWriter, write_classes

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
BACKGROUND = (18, 18, 24)
SCALE_RANGE = (0.35, 0.8)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, cx: float, cy: float, scale: float) -> np.ndarray:
    """Boolean coverage of ``shape`` at points (u, v) in [0, 1]^2 (v grows downwards)."""
    r = scale / 2
    du, dv = u - cx, v - cy
    if shape == "circle":
        return du**2 + dv**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(du), np.abs(dv)) <= 0.85 * r  # a bit smaller: same visual weight as the circle
    if shape == "triangle":  # apex up, base at the bottom of the box
        inside_base = dv <= r
        return inside_base & (np.abs(du) <= (dv + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(du) <= r) & (np.abs(dv) <= arm)) | ((np.abs(dv) <= r) & (np.abs(du) <= arm))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_shape(
    shape: str, colour: tuple[int, int, int], size: int, cx: float, cy: float, scale: float, image_size: int
) -> np.ndarray:
    """(image_size, image_size, 3) uint8: ``shape`` in ``colour`` on a dark background.

    ``size`` is the supersampling factor: coverage is computed on a ``size``-times finer grid
    and averaged, which antialiases the edges (1 = hard edges).
    """
    n = image_size * max(1, int(size))
    grid = (np.arange(n) + 0.5) / n
    u, v = np.meshgrid(grid, grid)  # (n, n) each, u along the width
    mask = shape_mask(shape, u, v, cx, cy, scale).astype(np.float32)
    alpha = mask.reshape(image_size, n // image_size, image_size, n // image_size).mean(axis=(1, 3))[..., None]
    image = (1 - alpha) * np.array(BACKGROUND, np.float32) + alpha * np.array(colour, np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def size_word(scale: float) -> str:
    return "small" if scale < 0.5 else "medium" if scale < 0.65 else "large"


def position_words(cx: float, cy: float) -> str:
    vertical = "top" if cy < 0.45 else "bottom" if cy > 0.55 else ""
    horizontal = "left" if cx < 0.45 else "right" if cx > 0.55 else ""
    if vertical:
        return f"at the {vertical} {horizontal}".rstrip()
    return f"on the {horizontal}" if horizontal else "in the centre"


def synthetic_images(num: int, image_size: int = 32, seed: int = 0) -> Iterator[dict]:
    """Yield ``num`` samples ``{"__key__", "png", "cls", "txt", "json"}``; ``cls`` indexes SHAPES."""
    colour_names = sorted(COLOURS)
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(len(SHAPES)))
        colour = colour_names[int(rng.integers(len(colour_names)))]
        scale = float(rng.uniform(*SCALE_RANGE))
        r = scale / 2
        cx, cy = (float(c) for c in rng.uniform(r, 1 - r, size=2))  # keep the whole shape inside
        shape = SHAPES[label]
        size = size_word(scale)
        yield {
            "__key__": f"{i:08d}",
            "png": render_shape(shape, COLOURS[colour], 4, cx, cy, scale, image_size),
            "cls": label,
            "txt": f"a {size} {colour} {shape} {position_words(cx, cy)}",
            "json": {"shape": shape, "colour": colour, "size": size, "scale": round(scale, 4), "x": round(cx, 4), "y": round(cy, 4)},
        }


def synthetic_mixed_images(num: int, image_size: int = 32, seed: int = 0) -> Iterator[dict]:
    """Like ``synthetic_images`` on canvases of mixed aspect ratios and sizes (for packing and budgets).

    The shape is rendered square (undistorted) at the canvas' shorter side, then placed at a random
    offset along the longer one; sides range over [image_size / 2, 2 * image_size], aspect 1:2 to 2:1."""
    for sample in synthetic_images(num, image_size=image_size, seed=seed):
        rng = np.random.default_rng([seed, int(sample["__key__"]), 1])
        short = int(rng.integers(max(4, image_size // 2), image_size + 1))
        long = int(round(short * rng.uniform(1.0, 2.0)))
        square = render_shape(sample["json"]["shape"], COLOURS[sample["json"]["colour"]], 4, sample["json"]["x"],
                              sample["json"]["y"], sample["json"]["scale"], short)
        canvas = np.empty((short, long, 3), np.uint8)
        canvas[:] = BACKGROUND
        offset = int(rng.integers(0, long - short + 1))
        canvas[:, offset : offset + short] = square
        if rng.random() < 0.5:  # portrait
            canvas = canvas.transpose(1, 0, 2).copy()
        yield {**sample, "png": canvas, "json": {**sample["json"], "height": canvas.shape[0], "width": canvas.shape[1]}}


def _images(num: int, seed: int = 0, size: int | None = None) -> Iterator[dict]:
    return synthetic_images(num, image_size=size or 32, seed=seed)


def _mixed_images(num: int, seed: int = 0, size: int | None = None) -> Iterator[dict]:
    return synthetic_mixed_images(num, image_size=size or 32, seed=seed)


SYNTHETIC_KINDS: dict[str, tuple[str, str, str]] = {
    "image": ("datamodules.synthetic:_images", "shard", "datamodules.synthetic:SHAPES"),
    "image-mixed": ("datamodules.synthetic:_mixed_images", "shard", "datamodules.synthetic:SHAPES"),
    "video": ("datamodules.video:synthetic_videos", "shard", "datamodules.synthetic:SHAPES"),
    "audio": ("datamodules.audio:synthetic_audio", "shard", "datamodules.audio:TIMBRES"),
    "speech": ("datamodules.audio:spoken_words", "shard", "datamodules.audio:DIGIT_WORDS"),  # needs espeak-ng
    "shape": ("datamodules.shapes:synthetic_shapes", "shard", "datamodules.shapes:SOLIDS"),
    "audiovideo": ("datamodules.audiovideo:synthetic_audiovideo", "shard", "datamodules.audiovideo:CLASSES"),
}
"""kind -> (sample generator ``fn(num, seed=, size=)``, shard prefix, class names), as "module:attribute"
(imported when used, so one modality's dependencies never load for another)."""


def _resolve(ref: str):
    module, attribute = ref.split(":")
    return getattr(importlib.import_module(module), attribute)


def write_synthetic(
    kind: str, out: str, num: int, shard_size: int = 1000, seed: int = 0, image_size: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Write ``num`` synthetic samples of ``kind`` to ``<out>/<prefix>-%06d.tar`` plus classes.json and index.json.

    image_size: the modality's resolution (image side, video frame side); None = its default."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; accepted: {', '.join(SYNTHETIC_KINDS)}")
    if num <= 0:
        raise ValueError(f"write_synthetic: num must be positive, got {num}")
    generate, prefix, classes = SYNTHETIC_KINDS[kind]
    write_classes(out, list(_resolve(classes)))
    samples = _resolve(generate)(num, seed=seed, size=image_size)
    with ShardWriter(os.path.join(out, f"{prefix}-%06d.tar"), maxcount=shard_size) as writer:
        for sample in tqdm(samples, total=num, desc=f"synthetic {kind}", unit="sample", disable=not progress):
            writer.write(sample)
    return writer.paths
