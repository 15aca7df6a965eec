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


def swap_pairs(x: Tensor) -> Tensor:
    """(x[1], x[0], x[3], x[2], ...) over the last dim: the partner of each coordinate in its rotated pair."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def rope_tables(cos: Tensor, sin: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """C = (c0, c0, c1, c1, ...) and S = (-s0, s0, -s1, s1, ...), each (B, N, 1.., D) in (at least)
    float32, from cos/sin (B, N, D/2), shaped for tensors like `like` (B, N, ..., D): build once,
    rotate q and k."""
    if cos.shape[-1] * 2 != like.shape[-1]:
        raise ValueError(f"rope: cos/sin last dim {cos.shape[-1]} must be half the head dim {like.shape[-1]}")
    ndim, dtype = like.ndim, torch.promote_types(like.dtype, torch.float32)
    cos, sin = cos.to(dtype), sin.to(dtype)
    c = torch.stack((cos, cos), dim=-1).flatten(-2)  # (B, N, D)
    s = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return tuple(t.reshape(*t.shape[:2], *[1] * (ndim - 3), t.shape[-1]) for t in (c, s))  # (B, N, 1.., D)


def rotate(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """x * C + swap_pairs(x) * S with `rope_tables`: computed in the tables' float32, returned in x's dtype
    (one rounding). The full-size tensor sees a multiply, a pair swap and an addcmul, read in its own
    dtype: one fused kernel when compiled, no float32 copy of x in eager."""
    return torch.addcmul(x * c, swap_pairs(x), s).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, N, ..., D) by cos/sin (B, N, D//2), broadcast over the dims
    between N and D (heads); computed in (at least) float32, returned in x's dtype."""
    return rotate(x, *rope_tables(cos, sin, x))
