"""Set tokenizer for shape latents: each of the K latent vectors is one token, with no position.

Letters: B batch, K latents (= tokens N), d latent dim (= values per token P).
A shape autoencoder's latent set (models/codecs/shape.py) is unordered, so the tokens carry no
positions and the backbone applies no RoPE to them (``pos=None``, as for the context stream):
attention over a set is permutation-equivariant, which is what a set needs. The latent vectors
are still told apart by their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from models.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class LatentSet(Tokenizer):
    latents: int = 64
    """K: latent vectors per shape (the autoencoder's ``latents``)."""
    latent_dim: int = 8
    """d: channels per latent vector (the autoencoder's ``latent_dim``); one token holds d values."""

    def __post_init__(self) -> None:
        if min(self.latents, self.latent_dim) <= 0:
            raise ValueError(f"LatentSet: latents and latent_dim must be positive, got {self}")

    @property
    def token_dim(self) -> int:
        return self.latent_dim

    rope_axes: ClassVar[int] = 0

    def latent_shape(self) -> tuple[int, ...]:
        return (self.latents, self.latent_dim)

    def check(self, shape: tuple[int, ...]) -> None:
        """ValueError unless ``shape`` is (B, K, d) with this tokenizer's d (any K tokenizes)."""
        if len(shape) != 3 or shape[-1] != self.latent_dim:
            raise ValueError(f"LatentSet: expected latents (B, K, {self.latent_dim}), got {tuple(shape)}")

    def tokenize(self, x: Tensor) -> tuple[Tensor, None]:
        self.check(tuple(x.shape))
        return x, None  # (B, K, d): the set is already tokens

    def untokenize(self, tokens: Tensor, shape: tuple[int, ...]) -> Tensor:
        self.check(tuple(shape))
        return tokens.reshape(shape)
