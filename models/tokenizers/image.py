"""2-D patch tokenizer for images (or image latents).

Letters: B batch, C channels, H/W height/width, p patch size, N = (H/p)(W/p) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from models.codecs.base import Codec
from models.tokenizers.base import Strides, Tokenizer, pixel_media


@dataclass(frozen=True)
class ImagePatches(Tokenizer):
    channels: int | None = None
    """Channels of the latent; None: the codec's latent channels (3 for pixels), set by the generator."""
    size: int = 32
    """Height and width of the latent that samples are generated at."""
    patch: int = 2
    """Patch side; each token holds channels * patch * patch values."""

    def __post_init__(self) -> None:
        if self.size % self.patch:
            raise ValueError(f"ImagePatches: size={self.size} must be a multiple of patch={self.patch}")

    @property
    def token_dim(self) -> int:
        return self.known_channels() * self.patch * self.patch

    rope_axes: ClassVar[int] = 2

    def latent_shape(self) -> tuple[int, ...]:
        return (self.known_channels(), self.size, self.size)

    def crop(self, latent: Tensor) -> Tensor:
        """Drop trailing rows and columns short of a whole patch (latents a codec made of any image size)."""
        h, w = latent.shape[-2] // self.patch * self.patch, latent.shape[-1] // self.patch * self.patch
        return latent[..., :h, :w]

    def media(self, codec: Codec | None, key: str) -> dict[str, Any]:
        return pixel_media(self.size, self.patch, Strides.of(codec), key)

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        return ((height or self.size) // self.patch) * ((width or self.size) // self.patch)

    def positions(self, height: int, width: int, device: torch.device | None = None) -> Tensor:
        """(N, 2) integer (row, col) grid of patch positions."""
        rows = torch.arange(height // self.patch, device=device)
        cols = torch.arange(width // self.patch, device=device)
        return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).float()

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch)
        pos = self.positions(h, w, x.device).expand(b, -1, -1)  # (B, N, 2)
        return tokens, pos

    def untokenize(self, tokens: Tensor, shape: tuple[int, ...]) -> Tensor:
        h, w = shape[-2] // self.patch, shape[-1] // self.patch
        return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch)
