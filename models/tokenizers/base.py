"""What a tokenizer is: a parameter-free map between a modality's latent tensor and tokens.

Letters: B batch, C channels, N tokens, P values per token, A position axes.
A modality differs from another only by its tokenizer, its codec and its config; the
backbone and the trainer are shared.
"""

from __future__ import annotations

from torch import Tensor


class Tokenizer:
    """Base of the tokenizer configs (a plain base class so YAML can pick one by class_path)."""

    token_dim: int
    """Values per token (P), e.g. C * p * p for an image patch."""
    rope_axes: int
    """Number of position axes the tokens carry (A); 0 for sets, whose positions are None (no RoPE)."""

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dim (what sampling starts from)."""
        raise NotImplementedError

    def crop(self, latent: Tensor) -> Tensor:
        """(..., *latent) trimmed to whole patches where a codec's output need not be (default: as is)."""
        return latent

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, *latent) -> tokens (B, N, P), positions (B, N, A) or None (a set: no positions)."""
        raise NotImplementedError

    def untokenize(self, tokens: Tensor, shape: tuple[int, ...]) -> Tensor:
        """tokens (B, N, P) -> (B, *latent) with the given full shape."""
        raise NotImplementedError
