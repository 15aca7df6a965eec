"""n-D axial rotary position embedding (Lumina / Flux style).

The head dim is split into one even part per position axis (time, height, width ...); each
part rotates consecutive pairs (x[2j], x[2j+1]) by pos_axis * theta^(-2j/d_axis). The score
q_m . k_n then depends on positions only through m - n, per axis. A stream without positions
(a text context, a latent set) simply gets no rotation.

Legend: B batch, N tokens, H heads, D head dim, A position axes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def default_axes_dims(head_dim: int, n_axes: int) -> list[int]:
    """Split head_dim into n_axes even parts; the first axes get the remainder."""
    if n_axes < 1:
        raise ValueError(f"rope: n_axes must be >= 1, got {n_axes}")
    if head_dim % 2 or head_dim // 2 < n_axes:
        raise ValueError(f"rope: head_dim={head_dim} must be even and give each of {n_axes} axes at least 2 dims")
    pairs, rem = divmod(head_dim // 2, n_axes)
    return [2 * (pairs + (i < rem)) for i in range(n_axes)]


def rope_cos_sin(pos: Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotation angles, each (B, N, D//2) float32, from positions (B, N, A)."""
    if pos.ndim != 3 or pos.shape[-1] != len(axes_dims):
        raise ValueError(f"rope: positions must be (B, N, {len(axes_dims)}), got {tuple(pos.shape)}")
    if any(d % 2 or d <= 0 for d in axes_dims):
        raise ValueError(f"rope: every axes_dim must be even and > 0, got {list(axes_dims)}")
    # float64 angles as Flux does: positions * freqs can be large, float32 loses the phase
    posd = pos.to(torch.float64)
    angles = []
    for a, d in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)  # (d/2,)
        angles.append(posd[..., a, None] * freqs)  # (B, N, d/2)
    ang = torch.cat(angles, dim=-1)  # (B, N, D/2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Rotate consecutive pairs of x (B, N, ..., D) by cos/sin (B, N, D//2), broadcast over the dims
    between N and D (heads; q and k together); computed in >= float32, returned in `out_dtype`
    (default x's dtype)."""
    if cos.shape[-1] * 2 != x.shape[-1]:
        raise ValueError(f"rope: cos/sin last dim {cos.shape[-1]} must be half the head dim {x.shape[-1]}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    # Flux form: a 2x2 rotation per pair, built once on the small (B, N, D/2) tables and broadcast
    # over heads, so the full-size tensor sees two multiplies and one add (no stack/cat of it).
    cos, sin = cos.to(dtype), sin.to(dtype)
    rot = torch.stack((cos, -sin, sin, cos), dim=-1).unflatten(-1, (2, 2))  # (B, N, D/2, 2, 2)
    rot = rot.reshape(*rot.shape[:2], *[1] * (x.ndim - 3), *rot.shape[2:])  # (B, N, 1.., D/2, 2, 2)
    pairs = x.to(dtype).unflatten(-1, (-1, 1, 2))  # (B, N, ..., D/2, 1, 2)
    out = rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]  # (B, N, ..., D/2, 2)
    return out.flatten(-2).to(out_dtype or x.dtype)
