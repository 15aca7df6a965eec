"""Images as files: tensors in [-1, 1] -> uint8 arrays -> PNG files and grids.

Letters: B batch, H/W height/width.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8_images(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) grid image."""
    b, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = img
    return grid


def save_images(x: Tensor, out_dir: str | Path, prefix: str = "sample", grid: bool = True, upscale: int = 1) -> list[Path]:
    """Write each image as PNG (and a grid.png); returns the paths, grid last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = to_uint8_images(x)
    paths = []
    for i, img in enumerate(images):
        path = out / f"{prefix}-{i:04d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    if grid:
        g = Image.fromarray(image_grid(images))
        if upscale > 1:
            g = g.resize((g.width * upscale, g.height * upscale), Image.NEAREST)
        path = out / f"{prefix}-grid.png"
        g.save(path)
        paths.append(path)
    return paths
