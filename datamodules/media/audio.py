"""Generated audio as files a person can open: one WAV per clip plus a spectrogram preview grid.

Letters: B clips, S samples, K frequency bins, F frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image
from torch import Tensor

from datamodules.media.image import image_grid

PREVIEW_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)
"""Colour ramp of the preview (inferno-like): quiet -> dark, loud -> pale yellow."""


def spectrogram_images(waves: Sequence[Tensor], n_fft: int = 256, hop: int = 128, floor_db: float = -80.0) -> np.ndarray:
    """(B, n_fft // 2 + 1, F_max, 3) uint8 log-magnitude spectrograms (dB from ``floor_db`` to 0 relative to
    full scale), low frequencies at the bottom, shorter clips padded dark. A preview for the eye, so a
    plain STFT (no mel scale, no codec) is enough."""
    window = torch.hann_window(n_fft)
    levels = []
    for wave in waves:
        w = wave.detach().float().cpu()
        w = torch.nn.functional.pad(w, (0, max(0, n_fft - w.numel())))
        mag = torch.stft(w, n_fft, hop, window=window, center=True, return_complex=True).abs() * (2 / window.sum())
        db = 20 * torch.log10(mag.clamp_min(10 ** (floor_db / 20)))  # (K, F), floor_db .. about 0
        levels.append(1 - db / floor_db)  # (K, F) in [0, 1]
    width = max(level.shape[-1] for level in levels)
    level = torch.zeros(len(levels), n_fft // 2 + 1, width)
    for i, lv in enumerate(levels):
        level[i, :, : lv.shape[-1]] = lv
    level = level.clamp(0, 1).flip(1).numpy()  # (B, K, F), low frequencies at the bottom
    ramp = np.linspace(0, 1, len(PREVIEW_COLOURS))
    rgb = np.stack([np.interp(level, ramp, PREVIEW_COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def save_audio(x: Tensor | Sequence[Tensor], out_dir: str | Path, sample_rate: int, prefix: str = "sample") -> list[Path]:
    """Write each clip ((B, S) in [-1, 1], or 1-D tensors of any lengths) as 16-bit WAV; the preview PNG last.

    The preview stacks the clips' spectrograms (``spectrogram_images``), 8 per column.
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
    Image.fromarray(image_grid(spectrogram_images(waves), nrow=max(1, len(waves) // 8))).save(path)
    paths.append(path)
    return paths
