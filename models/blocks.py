"""Transformer blocks of the MM-DiT: adaLN-Zero modulation, MLP, dual- and single-stream blocks.

DualStreamBlock (SD3 MM-DiT): every stream has its own weights; ONE joint attention runs over
all streams of a sample. SingleStreamBlock (Flux): shared weights over the joined sequence,
attention and MLP in parallel. Both are adaLN-Zero: modulation Linears start at zero, so each
block is exactly the identity at init (DiT).

Legend: S samples, B batch (S regular, 1 packed), N tokens, N_s tokens of stream s,
C model dim, H heads, D head dim (C = H * D), F hidden dim of the MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import RMSNorm, select_kernel
from models.packing import Layout
from models.rope import rope_tables, rotate

Rope = tuple[Tensor, Tensor]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift, one pass over x (addcmul) instead of two."""
    return torch.addcmul(shift, x, 1 + scale)


def _init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights, zero biases (DiT)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _zero(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (S, dim): sinusoidal features of 1000 t (the DiT frequency range), then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def sinusoid(self, t: Tensor, max_period: float = 10000.0) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (1000.0 * t.float())[:, None] * freqs  # (S, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb  # (S, freq_dim)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.sinusoid(t.reshape(-1))
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _qkv(qkv: Tensor, heads: int, q_norm: nn.Module, k_norm: nn.Module, rope: Rope | None) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3C) -> q, k, v (B, N, H, D): q and k after QK-norm then RoPE.

    Each norm is torch's rms_norm with its weight (one fused kernel on CUDA, float32 inside, the
    input's dtype out) read straight from qkv; RoPE reads its output in that dtype and rounds once
    (models/rope.py): two roundings, no float32 copy of q or k; RoPE's tables are built once for both."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)  # views, no copy
    q, k = q_norm(q), k_norm(k)
    if rope is not None:
        tables = rope_tables(*rope, q)  # shared by q and k
        q, k = rotate(q, *tables), rotate(k, *tables)
    return q, k, v


class StreamLayers(nn.Module):
    """The weights one stream owns inside a DualStreamBlock."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        head_dim = dim // heads
        self.mod = nn.Linear(dim, 6 * dim)  # shift/scale/gate for attention and MLP
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))


class DualStreamBlock(nn.Module):
    """Per-stream weights, one joint attention over all streams (SD3 MM-DiT; LTX-2 with 3 streams)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        n_streams: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"DualStreamBlock: dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.attn_backend = attn_backend
        self.attend = select_kernel(attn_backend)  # chosen once, here, not per call
        self.streams = nn.ModuleList(StreamLayers(dim, heads, mlp_ratio, qk_norm) for _ in range(n_streams))
        _init_linears(self)
        for p in self.streams:
            _zero(p.mod)  # adaLN-Zero: identity at init

    def forward(self, xs: list[Tensor], c: Tensor, rope: list[Rope | None], layout: Layout) -> list[Tensor]:
        """xs[s] (B, N_s, C), c (S, C) -> list of (B, N_s, C)."""
        if len(xs) != len(self.streams) or len(rope) != len(self.streams):
            raise ValueError(f"DualStreamBlock: expected {len(self.streams)} streams, got {len(xs)} xs and {len(rope)} rope")
        c = F.silu(c)
        mods, qs, ks, vs = [], [], [], []
        for s, (x, p) in enumerate(zip(xs, self.streams)):
            mod = layout.expand(p.mod(c), s).chunk(6, dim=-1)  # 6 x (B, 1|N_s, C)
            mods.append(mod)
            h = modulate(p.norm1(x), mod[0], mod[1])
            q, k, v = _qkv(p.qkv(h), self.heads, p.q_norm, p.k_norm, rope[s])
            qs.append(q), ks.append(k), vs.append(v)

        q, k, v = layout.join(qs), layout.join(ks), layout.join(vs)  # (B, N, H, D) each
        a = self.attend(q, k, v, layout.joint())
        a = rearrange(a, "b n h d -> b n (h d)")
        attn_out = layout.split(a, sizes=[x.shape[1] for x in xs])

        out = []
        for x, a, p, mod in zip(xs, attn_out, self.streams, mods):
            _, _, gate1, shift2, scale2, gate2 = mod
            x = torch.addcmul(x, gate1, p.proj(a))  # x + gate1 * proj(a), one pass
            x = torch.addcmul(x, gate2, p.mlp(modulate(p.norm2(x), shift2, scale2)))
            out.append(x)
        return out


class SingleStreamBlock(nn.Module):
    """Shared weights over the joined sequence; attention and MLP in parallel from one linear (Flux)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, attn_backend: str = "auto"
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SingleStreamBlock: dim={dim} must be divisible by heads={heads}")
        self.dim, self.heads, self.hidden = dim, heads, int(dim * mlp_ratio)
        self.attn_backend = attn_backend
        self.attend = select_kernel(attn_backend)  # chosen once, here, not per call
        self.mod = nn.Linear(dim, 3 * dim)  # shift, scale, gate
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 3 * dim + self.hidden)  # qkv and MLP hidden in one matmul
        self.linear2 = nn.Linear(dim + self.hidden, dim)  # attention out proj and MLP out in one matmul
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.act = nn.GELU(approximate="tanh")
        _init_linears(self)
        _zero(self.mod)  # adaLN-Zero: identity at init

    def forward(self, x: Tensor, c: Tensor, rope: Rope | None, layout: Layout) -> Tensor:
        """x (B, N, C) the joined sequence of a batch laid out by `layout` (any streams), c (S, C) per sample.

        The modulation Linear runs once per sample and its output is spread over the tokens
        (packed: by each token's sample), not run on every token.
        """
        layout = layout.joint()  # one stream, the joined sequence; a cached attribute, free per block
        mod = layout.expand(self.mod(F.silu(c)))  # (S, 1, 3C) regular, (1, N, 3C) packed
        shift, scale, gate = mod.chunk(3, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        qkv, mlp = self.linear1(h).split([3 * self.dim, self.hidden], dim=-1)
        a = self.attend(*_qkv(qkv, self.heads, self.q_norm, self.k_norm, rope), layout)
        a = rearrange(a, "b n h d -> b n (h d)")
        return torch.addcmul(x, gate, self.linear2(torch.cat([a, self.act(mlp)], dim=-1)))
