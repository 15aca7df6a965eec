"""A generated stream's batch as tokens: regular (all samples the same size) or packed.

Letters: S samples, B batch (S regular, 1 packed), N tokens, P values per token, A position axes.

A batch of latents is either one tensor (S, *latent) — every sample the same shape — or a list
of S tensors of different shapes (images of mixed sizes, clips of mixed lengths). The first
becomes regular tokens (S, N, P); the second is tokenized sample by sample and packed end to end
into (1, sum N_i, P) with per-sample token counts (NaViT): no padding, no cropping. Patchify is a
permutation of values, so the flow (noise, interpolation, velocity target) runs on tokens the
same as on latents. Which token belongs to which sample is the stream's one-stream `Layout`
(models/packing.py), the same object the backbone and attention read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.packing import Layout
from models.tokenizers.base import Tokenizer

Latents = Tensor | list[Tensor]
"""(S, *latent) for same-sized samples, else a list of S tensors (*latent_i)."""


@dataclass
class Tokens:
    """One stream's tokens with what is needed to put them back into latents."""

    x: Tensor
    """(S, N, P) regular or (1, sum N_i, P) packed."""
    pos: Tensor | None
    """(S|1, N, A) positions for RoPE, or None (sets without positions)."""
    layout: Layout
    """One stream: regular (`Layout()`) or packed with the tokens of each sample."""
    shapes: list[tuple[int, ...]]
    """Per-sample latent shapes (without the batch dim)."""

    @property
    def num_samples(self) -> int:
        return len(self.shapes)

    def with_x(self, x: Tensor) -> "Tokens":
        """Same layout, other values (noise, x_t, the predicted velocity)."""
        return Tokens(x, self.pos, self.layout, self.shapes)

    def token_counts(self) -> list[int]:
        """Tokens of each sample."""
        return self.layout.stream_seqlens(0) if self.layout.is_packed else [self.x.shape[1]] * self.num_samples

    def per_token(self, values: Tensor) -> Tensor:
        """Per-sample values (S,) -> broadcastable against x: (S, 1, 1) regular, (1, N, 1) packed."""
        return self.layout.expand(values[:, None])


def tokenize(tokenizer: Tokenizer, latents: Latents) -> Tokens:
    """Latents -> Tokens: a tensor gives a regular batch, a list of differently shaped samples a packed one."""
    if isinstance(latents, Tensor):
        x, pos = tokenizer.tokenize(latents)
        return Tokens(x, pos, Layout(), [tuple(latents.shape[1:])] * latents.shape[0])
    if not latents:
        raise ValueError("tokenize: empty batch")
    if all(z.shape == latents[0].shape for z in latents):
        return tokenize(tokenizer, torch.stack(latents))
    parts = [tokenizer.tokenize(z[None]) for z in latents]  # each (1, N_i, P), (1, N_i, A)
    pos = None if parts[0][1] is None else torch.cat([p for _, p in parts], dim=1)
    layout = Layout.packed([[x.shape[1] for x, _ in parts]])
    return Tokens(torch.cat([x for x, _ in parts], dim=1), pos, layout, [tuple(z.shape) for z in latents])


def as_packed(tokens: Tokens) -> Tokens:
    """The same tokens in packed form (1, S N, P), for streams joined with packed ones."""
    if tokens.layout.is_packed:
        return tokens
    s, n = tokens.x.shape[:2]
    pos = None if tokens.pos is None else tokens.pos.expand(s, -1, -1).reshape(1, s * n, -1)
    return Tokens(tokens.x.reshape(1, s * n, -1), pos, Layout.packed([[n] * s]), tokens.shapes)


def untokenize(tokenizer: Tokenizer, tokens: Tokens) -> Latents:
    """Exact inverse of `tokenize` (a packed batch comes back as a list)."""
    if not tokens.layout.is_packed:
        return tokenizer.untokenize(tokens.x, (tokens.num_samples, *tokens.shapes[0]))
    pieces = tokens.x.split(tokens.token_counts(), dim=1)
    return [tokenizer.untokenize(p, (1, *shape))[0] for p, shape in zip(pieces, tokens.shapes)]


def per_sample_mse(pred: Tensor, target: Tensor, layout: Layout) -> Tensor:
    """(S,) mean squared error of each sample over its own tokens (packed: segment means).

    Every sample weighs the same whatever its length, as in the regular batch."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16 squares lose too much
    sq = (pred.to(dtype) - target.to(dtype)) ** 2
    if not layout.is_packed:
        return sq.flatten(1).mean(1)
    per_token = sq[0].sum(-1)  # (N,)
    counts = layout.cu_seqlens(sq.device).diff()  # (S,) tokens per sample
    sums = torch.zeros(layout.num_samples(), dtype=dtype, device=sq.device)
    sums = sums.index_add_(0, layout.segment_ids(sq.device), per_token)
    return sums / (counts * sq.shape[-1]).clamp_min(1)


def map_latents(fn, latents: Latents) -> Latents:
    """Apply a batched fn (e.g. a codec) to a tensor batch, or sample by sample to a list."""
    if isinstance(latents, Tensor):
        return fn(latents)
    return [fn(z[None])[0] for z in latents]
