"""MMDiT: the one backbone of every generator.

depth_dual DualStreamBlocks (per-stream weights, joint attention), then depth_single
SingleStreamBlocks over the joined streams, then a final adaLN + LayerNorm per generated
stream. Streams come in already embedded to `dim`; the generator owns patchify/unpatchify and
the output projection. Conditioning c = t_embed(t) + y goes through adaLN-Zero.

Legend: S samples, B batch (S regular, 1 packed), N_s tokens of stream s, N joined tokens,
C model dim, D head dim, A position axes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from datamodules.media.spec import agree
from models.attention import BACKENDS
from models.blocks import DualStreamBlock, Rope, SingleStreamBlock, TimestepEmbedder, modulate
from models.packing import Layout
from models.rope import default_axes_dims, rope_cos_sin


@dataclass
class MMDiTConfig:
    dim: int = 256
    """Model width C."""
    heads: int = 4
    """Attention heads; dim must be divisible by heads."""
    depth_dual: int = 4
    """Number of dual-stream blocks (per-stream weights, joint attention)."""
    depth_single: int = 2
    """Number of single-stream blocks (shared weights over the joined streams)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of dim."""
    streams: int | None = None
    """Streams in the dual-stream blocks, e.g. [x, ctx] = 2, [video, audio, ctx] = 3. None: set by the
    generator (its generated streams + the context); an MMDiT built alone needs it set."""
    out_streams: int | None = None
    """The first out_streams streams are returned (the generated ones). None: set by the generator."""
    rope_axes: int | None = None
    """Position axes of RoPE (1 audio, 2 image, 3 video); positions are given as (B, N, rope_axes).
    None: set by the generator from its tokenizer."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (keeps attention logits bounded in bf16)."""
    attn_backend: str = "auto"
    """Attention backend: auto, xformers, sdpa or math."""
    checkpointing: bool = False
    """Activation checkpointing per block (recompute in backward), only while training."""
    compile: bool = False
    """torch.compile each block (dynamic shapes, so new packed lengths or image sizes don't recompile)."""

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"MMDiTConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if self.dim < 1:
            raise bad("dim", "a positive integer")
        if self.heads < 1 or self.dim % self.heads:
            raise bad("heads", f"a positive divisor of dim={self.dim}")
        if self.head_dim % 2:
            raise bad("heads", f"a value giving an even head dim (dim/heads = {self.head_dim})")
        if self.rope_axes is not None and not 1 <= self.rope_axes <= self.head_dim // 2:
            raise bad("rope_axes", f"between 1 and head_dim/2 = {self.head_dim // 2}")
        if self.depth_dual < 0:
            raise bad("depth_dual", ">= 0")
        if self.depth_single < 0:
            raise bad("depth_single", ">= 0")
        if self.mlp_ratio <= 0:
            raise bad("mlp_ratio", "> 0")
        if self.streams is not None and self.streams < 1:
            raise bad("streams", ">= 1")
        if self.out_streams is not None and not 1 <= self.out_streams <= (self.streams or self.out_streams):
            raise bad("out_streams", f"between 1 and streams={self.streams}")
        if self.attn_backend not in BACKENDS:
            raise bad("attn_backend", f"one of {', '.join(BACKENDS)}")

    def derive(self, owner: str, generated: int, rope_axes: int) -> MMDiTConfig:
        """This config with what a generator derives: streams = its ``generated`` streams + the context,
        out_streams = ``generated``, and the RoPE axes of its tokenizer (0, a set without positions: any
        valid value, 1 when unset). A stated value that contradicts is one ValueError line."""
        why = f"{owner}'s {generated} generated stream{'s' if generated > 1 else ''} + the context"
        return replace(
            self,
            streams=agree("model.backbone.streams", self.streams, generated + 1, why),
            out_streams=agree("model.backbone.out_streams", self.out_streams, generated, f"{owner}'s generated streams"),
            rope_axes=(self.rope_axes or 1) if rope_axes == 0 else
            agree("model.backbone.rope_axes", self.rope_axes, rope_axes, f"the position axes of {owner}'s tokenizer"),
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def axes_dims(self) -> list[int]:
        """Head-dim split between the RoPE axes."""
        return default_axes_dims(self.head_dim, self.rope_axes)

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


class FinalNorm(nn.Module):
    """adaLN (shift, scale from c; zero-init) then LayerNorm, for one generated stream."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: Tensor, c: Tensor, layout: Layout, stream: int) -> Tensor:
        shift, scale = layout.expand(self.mod(F.silu(c)), stream).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        unset = [name for name in ("streams", "out_streams", "rope_axes") if getattr(cfg, name) is None]
        if unset:
            raise ValueError(f"MMDiT: MMDiTConfig.{', '.join(unset)} unset; a generator derives them (MMDiTConfig.derive), "
                             "an MMDiT built alone needs them stated")
        self.cfg = cfg
        kw = dict(mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm, attn_backend=cfg.attn_backend)
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.dual = nn.ModuleList(
            DualStreamBlock(cfg.dim, cfg.heads, cfg.streams, **kw) for _ in range(cfg.depth_dual)
        )
        self.single = nn.ModuleList(SingleStreamBlock(cfg.dim, cfg.heads, **kw) for _ in range(cfg.depth_single))
        self.final = nn.ModuleList(FinalNorm(cfg.dim) for _ in range(cfg.out_streams))
        if cfg.compile:
            for block in [*self.dual, *self.single]:
                # in place: state-dict keys stay the same; fullgraph: a graph break is an error, not a slowdown
                block.compile(dynamic=True, fullgraph=True)

    def forward(
        self,
        xs: list[Tensor],
        t: Tensor,
        y: Tensor | None,
        pos: list[Tensor | None],
        layout: Layout | None = None,
    ) -> list[Tensor]:
        """xs[s] (B, N_s, C) embedded streams, t (S,) in [0, 1], y (S, C) or None, pos[s] (B|1, N_s, A) or None.

        Returns the first out_streams streams, each (B, N_s, C).
        """
        cfg = self.cfg
        layout = Layout() if layout is None else layout
        self._check_inputs(xs, t, y, pos, layout)
        layout = layout.to(xs[0].device)  # every index tensor on the device once, before the (compiled) blocks

        c = self.t_embed(t).to(xs[0].dtype)  # (S, C)
        if y is not None:
            c = c + y
        rope: list[Rope | None] = [
            None if p is None else rope_cos_sin(p, cfg.axes_dims, cfg.rope_theta) for p in pos
        ]  # each (B|1, N_s, D/2)

        for block in self.dual:
            xs = self._run(block, xs, c, rope, layout)

        if self.single:
            sizes = [x.shape[1] for x in xs]
            x = layout.join(xs)  # (B, N, C)
            rope_joined = self._join_rope(rope, xs, layout)
            for block in self.single:
                x = self._run(block, x, c, rope_joined, layout)
            xs = layout.split(x, sizes=sizes)

        return [self.final[s](xs[s], c, layout, s) for s in range(cfg.out_streams)]

    def _run(self, block: nn.Module, *args: object) -> object:
        if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _join_rope(self, rope: list[Rope | None], xs: list[Tensor], layout: Layout) -> Rope | None:
        """cos/sin over the joined sequence; streams without positions get the identity rotation."""
        if all(r is None for r in rope):
            return None
        b, half = xs[0].shape[0], self.cfg.head_dim // 2
        cos, sin = [], []
        for r, x in zip(rope, xs):
            if r is None:
                shape = (b, x.shape[1], half)
                r = (torch.ones(shape, device=x.device), torch.zeros(shape, device=x.device))
            cos.append(r[0].expand(b, -1, -1))
            sin.append(r[1].expand(b, -1, -1))
        return layout.join(cos), layout.join(sin)  # each (B, N, D/2)

    def _check_inputs(
        self, xs: list[Tensor], t: Tensor, y: Tensor | None, pos: list[Tensor | None], layout: Layout
    ) -> None:
        cfg = self.cfg
        if len(xs) != cfg.streams or len(pos) != cfg.streams:
            raise ValueError(f"MMDiT: expected {cfg.streams} streams, got {len(xs)} xs and {len(pos)} pos")
        n_samples = layout.num_samples() if layout.is_packed else xs[0].shape[0]
        for s, (x, p) in enumerate(zip(xs, pos)):
            if x.ndim != 3 or x.shape[-1] != cfg.dim or x.shape[0] != (1 if layout.is_packed else n_samples):
                raise ValueError(f"MMDiT: stream {s} has shape {tuple(x.shape)}, expected (B, N_s, {cfg.dim})")
            if p is not None and (p.ndim != 3 or p.shape[1] != x.shape[1] or p.shape[2] != cfg.rope_axes):
                raise ValueError(
                    f"MMDiT: pos[{s}] has shape {tuple(p.shape)}, expected (B, {x.shape[1]}, rope_axes={cfg.rope_axes})"
                )
        if t.shape != (n_samples,):
            raise ValueError(f"MMDiT: t has shape {tuple(t.shape)}, expected ({n_samples},) one time per sample")
        if y is not None and y.shape != (n_samples, cfg.dim):
            raise ValueError(f"MMDiT: y has shape {tuple(y.shape)}, expected ({n_samples}, {cfg.dim})")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Analytic forward FLOPs per token for a joined sequence of seq_len tokens.

        A matmul (m x k) @ (k x n) costs 2 m n k; per token that is 2 k n per Linear.
        With C = dim, F = mlp hidden, L = seq_len:
          dual block:   2 (3C^2 + C^2 + 2 C F) + 4 L C   (qkv, out proj, MLP; QK^T and AV)
          single block: 2 (C (3C + F) + (C + F) C) + 4 L C  (linear1, linear2; QK^T and AV)
        Per-sample work (timestep MLP, modulation Linears) and norms/elementwise ops are left out.
        Training costs about 3x this (forward + backward).
        """
        c, f, n = self.cfg.dim, self.cfg.mlp_hidden, seq_len
        attn = 4 * n * c
        dual = 2 * (4 * c * c + 2 * c * f) + attn
        single = 2 * (c * (3 * c + f) + (c + f) * c) + attn
        return float(self.cfg.depth_dual * dual + self.cfg.depth_single * single)
