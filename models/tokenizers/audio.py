"""1-D patch tokenizer for audio latents (log-mel frames).

Letters: B batch, C channels (mel bins), F frames, p frames per token, N = F/p tokens.
Any F that is a multiple of p works, so clips of different lengths tokenize one by one (B=1)
for packed variable-length batches; ``frames`` is only the default length to sample at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from datamodules.media.spec import TokenAxis
from models.codecs.base import Codec
from models.tokenizers.base import Strides, Tokenizer


@dataclass(frozen=True)
class AudioFrames(Tokenizer):
    channels: int | None = None
    """Channels of the latent; None: the codec's (its mel bins), set by the generator."""
    frames: int | None = None
    """Latent frames that samples are generated at by default; None: 64 (AudioFlow), or as long as
    the video (AudioVideoFlow), set by the generator."""
    patch: int = 2
    """Frames per token; each token holds channels * patch values."""

    default_frames: ClassVar[int] = 64

    def __post_init__(self) -> None:
        if self.frames is not None and self.frames % self.patch:
            raise ValueError(f"AudioFrames: frames={self.frames} must be a multiple of patch={self.patch}")

    @property
    def token_dim(self) -> int:
        return self.known_channels() * self.patch

    rope_axes: ClassVar[int] = 1

    def latent_shape(self) -> tuple[int, ...]:
        return (self.known_channels(), self.frames or self.default_frames)

    def num_tokens(self, frames: int | None = None) -> int:
        return (frames or self.frames or self.default_frames) // self.patch

    def media(self, codec: Codec | None, key: str) -> dict[str, Any]:
        s = Strides.of(codec)
        return {"samples": TokenAxis(stride=s.hop, patch=self.patch, extra=s.extra_frames)}

    def positions(self, frames: int, device: torch.device | None = None) -> Tensor:
        """(N, 1) token index along time."""
        return torch.arange(frames // self.patch, device=device, dtype=torch.float32)[:, None]

    def crop(self, latent: Tensor) -> Tensor:
        """Drop the last F mod p frames (a mel codec gives F = S // hop + 1, any count): at most p - 1 frames."""
        return latent[..., : latent.shape[-1] // self.patch * self.patch]

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, f = x.shape
        if f % self.patch:
            raise ValueError(f"AudioFrames: {f} frames is not a multiple of patch={self.patch}")
        tokens = rearrange(x, "b c (n p) -> b n (c p)", p=self.patch)
        pos = self.positions(f, x.device).expand(b, -1, -1)  # (B, N, 1)
        return tokens, pos

    def untokenize(self, tokens: Tensor, shape: tuple[int, ...]) -> Tensor:
        return rearrange(tokens, "b n (c p) -> b c (n p)", n=shape[-1] // self.patch, p=self.patch)
