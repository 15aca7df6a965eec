"""Generated audio as files a person can open: one WAV per clip plus a log-mel preview grid.

Letters: B clips, S samples, M mel bins, F frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image
from torch import Tensor

from models.codecs.mel import MelCodec
from models.media import image_grid

PREVIEW_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)
"""Colour ramp of the preview (inferno-like): quiet -> dark, loud -> pale yellow."""


def spectrogram_images(waves: Sequence[Tensor], sample_rate: int, row_scale: int = 2) -> np.ndarray:
    """(B, M * row_scale, F_max, 3) uint8 log-mel images, low frequencies at the bottom, padded dark."""
    codec = MelCodec(sample_rate=sample_rate)
    mels = [codec.encode(w.detach().float().cpu()[None])[0] for w in waves]  # (M, F) each, about [-1, 1]
    width = max(m.shape[-1] for m in mels)
    level = torch.full((len(mels), codec.n_mels, width), -1.0)
    for i, m in enumerate(mels):
        level[i, :, : m.shape[-1]] = m
    level = ((level.clamp(-1, 1) + 1) / 2).flip(1).repeat_interleave(row_scale, dim=1).numpy()  # (B, H, F) in [0, 1]
    ramp = np.linspace(0, 1, len(PREVIEW_COLOURS))
    rgb = np.stack([np.interp(level, ramp, PREVIEW_COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def save_audio(x: Tensor | Sequence[Tensor], out_dir: str | Path, sample_rate: int, prefix: str = "sample") -> list[Path]:
    """Write each clip ((B, S) in [-1, 1], or 1-D tensors of any lengths) as 16-bit WAV; the preview PNG last.

    The preview stacks the clips' log-mel spectrograms (MelCodec defaults at ``sample_rate``), 8 per column.
    """
    waves = [torch.as_tensor(w) for w in (x[None] if isinstance(x, Tensor) and x.ndim == 1 else x)]
    if not waves or any(w.ndim != 1 or w.numel() == 0 for w in waves):
        raise ValueError("save_audio: expected a (B, samples) tensor or a non-empty list of non-empty 1-D tensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, wave in enumerate(waves):
        path = out / f"{prefix}-{i:04d}.wav"
        soundfile.write(path, wave.detach().float().clamp(-1, 1).cpu().numpy(), sample_rate, subtype="PCM_16")
        paths.append(path)
    path = out / f"{prefix}-spectrograms.png"
    Image.fromarray(image_grid(spectrogram_images(waves, sample_rate), nrow=max(1, len(waves) // 8))).save(path)
    paths.append(path)
    return paths
