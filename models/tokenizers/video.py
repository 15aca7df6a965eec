"""3-D patch tokenizer for video (or video latents): tubelets of tpatch frames by patch x patch pixels.

Letters: B batch, C channels, T frames, H/W height/width, k temporal patch (tpatch), p patch
side, N = (T/k)(H/p)(W/p) tokens in (t, row, col) order, time slowest.
Any T, H, W that are multiples of the patch sizes tokenize: packed batches hold clips of
different lengths, tokenized one by one with B = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from datamodules.media.spec import TokenAxis
from models.codecs.base import Codec
from models.tokenizers.base import Strides, Tokenizer, by_factor, pixel_media


@dataclass(frozen=True)
class VideoPatches(Tokenizer):
    channels: int | None = None
    """Channels of the latent; None: the codec's latent channels (3 for pixels), set by the generator."""
    frames: int | None = None
    """Latent frames that samples are generated with (the longest training clip by default); None: the
    generator's ``seconds`` x fps, else 8."""
    size: int = 16
    """Height and width of the latent that samples are generated at."""
    patch: int = 2
    """Spatial patch side."""
    tpatch: int = 1
    """Frames per token; each token holds channels * tpatch * patch * patch values."""

    default_frames: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if min(self.channels or 1, self.frames or 1, self.size, self.patch, self.tpatch) <= 0:
            raise ValueError(f"VideoPatches: all sizes must be positive, got {self}")
        if self.size % self.patch:
            raise ValueError(f"VideoPatches: size={self.size} must be a multiple of patch={self.patch}")
        if self.length % self.tpatch:
            raise ValueError(f"VideoPatches: frames={self.length} must be a multiple of tpatch={self.tpatch}")

    @property
    def length(self) -> int:
        """The latent frames samples are generated with: ``frames``, else the default."""
        return self.frames or self.default_frames

    @property
    def token_dim(self) -> int:
        return self.known_channels() * self.tpatch * self.patch * self.patch

    rope_axes: ClassVar[int] = 3

    def latent_shape(self) -> tuple[int, ...]:
        return (self.known_channels(), self.length, self.size, self.size)

    def crop(self, latent: Tensor) -> Tensor:
        """Drop trailing frames short of a whole tubelet and rows/columns short of a whole patch."""
        t = latent.shape[-3] // self.tpatch * self.tpatch
        h, w = latent.shape[-2] // self.patch * self.patch, latent.shape[-1] // self.patch * self.patch
        return latent[..., :t, :h, :w]

    def media(self, codec: Codec | None, key: str) -> dict[str, Any]:
        s = Strides.of(codec)
        media = pixel_media(self.size, self.patch, s, key)
        k, by = s.temporal, by_factor(s.temporal, "temporal")
        media["sources"].update(frames=f"{key}.frames{by}", frame_multiple=f"{key}.tpatch{by}")
        time = TokenAxis(stride=k, patch=self.tpatch, causal=s.causal)
        return {**media, "frames": time.span(self.length), "time": time}

    def num_tokens(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> int:
        t, h, w = frames or self.length, height or self.size, width or self.size
        return (t // self.tpatch) * (h // self.patch) * (w // self.patch)

    def positions(self, frames: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
        """(N, 3) integer-valued float (t, row, col) grid of tubelet positions, t slowest."""
        axes = (
            torch.arange(frames // self.tpatch, device=device),
            torch.arange(height // self.patch, device=device),
            torch.arange(width // self.patch, device=device),
        )
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).float()

    def check(self, shape: tuple[int, ...]) -> None:
        """ValueError unless ``shape`` ends in (C, T, H, W) with T, H, W whole multiples of the patch sizes."""
        whole = len(shape) >= 4 and not (shape[-3] % self.tpatch or shape[-2] % self.patch or shape[-1] % self.patch)
        if not whole or shape[-4] != self.channels:
            raise ValueError(
                f"VideoPatches: expected (B, {self.channels}, T, H, W) with T a multiple of tpatch={self.tpatch} "
                f"and H, W multiples of patch={self.patch}, got {tuple(shape)}"
            )

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check(x.shape)
        b, _, t, h, w = x.shape
        tokens = rearrange(x, "b c (t k) (h p) (w q) -> b (t h w) (c k p q)", k=self.tpatch, p=self.patch, q=self.patch)
        pos = self.positions(t, h, w, x.device).expand(b, -1, -1)  # (B, N, 3)
        return tokens, pos

    def untokenize(self, tokens: Tensor, shape: tuple[int, ...]) -> Tensor:
        self.check(tuple(shape))
        t, h, w = shape[-3] // self.tpatch, shape[-2] // self.patch, shape[-1] // self.patch
        return rearrange(
            tokens, "b (t h w) (c k p q) -> b c (t k) (h p) (w q)", t=t, h=h, w=w, k=self.tpatch, p=self.patch, q=self.patch
        )
