"""What a tokenizer is: a parameter-free map between a modality's latent tensor and tokens, and the media it implies.

Letters: B batch, C channels, N tokens, P values per token, A position axes.
A modality differs from another only by its tokenizer, its codec and its config; the
backbone and the trainer are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from datamodules.media.spec import TokenAxis
from models.codecs.base import Codec


@dataclass(frozen=True)
class Strides:
    """Media steps per latent step of a first stage (codec), as a tokenizer needs them to describe its media.

    Read from the codec's ``spatial_factor``, ``temporal_factor``, ``hop`` and ``extra_frames``
    (PretrainedAutoencoder, MelCodec); a codec without them is 1 (0 extra frames): pixels, waveforms, sets."""

    spatial: int = 1
    """Pixels per latent pixel along H and W."""
    temporal: int = 1
    """Frames per latent frame."""
    hop: int = 1
    """Audio samples per latent frame."""
    extra_frames: int = 0
    """Latent frames beyond samples // hop (a centred STFT adds one)."""
    causal: bool = False
    """The codec encodes the first frame alone, then temporal frames at a time (Wan, LTX)."""

    @classmethod
    def of(cls, codec: Codec | None) -> Strides:
        if codec is None:
            return cls()
        return cls(int(codec.spatial_factor), int(codec.temporal_factor), int(codec.hop), int(codec.extra_frames),
                   bool(codec.causal))


def by_factor(factor: int, what: str) -> str:
    """The text " x the codec's <what> factor f" for a MediaSpec source; empty when f = 1 (pixels)."""
    return f" x the codec's {what} factor {factor}" if factor != 1 else ""


def pixel_media(size: int, patch: int, strides: Strides, key: str) -> dict[str, Any]:
    """MediaSpec fields of images or frames: side size x f pixels, patch x f pixels per token side (f: spatial factor)."""
    f, by = strides.spatial, by_factor(strides.spatial, "spatial")
    return {"size": size * f, "pixels": TokenAxis(stride=f, patch=patch),
            "sources": {"size": f"{key}.size{by}", "multiple": f"{key}.patch{by}"}}


class Tokenizer:
    """Base of the tokenizer configs (a plain base class so YAML can pick one by class_path)."""

    token_dim: int
    """Values per token (P), e.g. C * p * p for an image patch."""
    rope_axes: int
    """Number of position axes the tokens carry (A); 0 for sets, whose positions are None (no RoPE)."""

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dim (what sampling starts from)."""
        raise NotImplementedError

    def known_channels(self) -> int:
        """The latent's channels, once the generator has set them from its codec (``channels`` left None)."""
        channels = getattr(self, "channels", None)
        if channels is None:
            raise ValueError(f"{type(self).__name__}.channels is unset; expected the generator to set it from its codec")
        return channels

    def media(self, codec: Codec | None, key: str) -> dict[str, Any]:
        """This stream's part of the generator's MediaSpec (datamodules/media/spec.py): its fields, plus
        ``sources`` (field -> config key) for error messages; ``key`` is this tokenizer's config key.
        Default: nothing (a latent set costs one token per latent and has no media sizes)."""
        return {}

    def crop(self, latent: Tensor) -> Tensor:
        """(..., *latent) trimmed to whole patches where a codec's output need not be (default: as is)."""
        return latent

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, *latent) -> tokens (B, N, P), positions (B, N, A) or None (a set: no positions)."""
        raise NotImplementedError

    def untokenize(self, tokens: Tensor, shape: tuple[int, ...]) -> Tensor:
        """tokens (B, N, P) -> (B, *latent) with the given full shape."""
        raise NotImplementedError
