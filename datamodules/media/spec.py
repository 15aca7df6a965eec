"""What a generator's media look like, stated once in the model and followed by the data.

A value two parts of a config need (the image side, the pixel multiple that tokenizes whole,
the frame rate, the sample rate) lives in the model. The model describes its media as a
``MediaSpec`` (``FlowMatchingModule.media_spec``); ``ShardDataModule.setup`` hands it to the data
transform, which fills in the options its config left unset (None) and counts a sample's tokens
with it (``cost``, the unit of ``data.batch_budget``).

``agree`` is the rule wherever a value is derived (here and in the models): left out, the derived
value is taken; stated, it must equal the derived one, else one ValueError line names both.

It lives under ``datamodules.media`` because both sides import it: ``models`` may import
``datamodules.media``, ``datamodules`` never imports ``models``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


def agree(key: str, stated: T | None, derived: T, source: str) -> T:
    """``derived`` when the config left ``key`` out (None); a stated value must equal it (one-line ValueError)."""
    if stated is None or stated == derived:
        return derived
    raise ValueError(f"{key}={stated!r} contradicts {source} = {derived!r}; leave {key} out: it is derived")


def agree_multiple(key: str, stated: int | None, derived: int, source: str) -> int:
    """Like ``agree`` for a granularity: a stated value may be any multiple of the derived one (it still tokenizes whole)."""
    if stated is None:
        return derived
    if stated > 0 and stated % derived == 0:
        return stated
    raise ValueError(f"{key}={stated!r} contradicts {source} = {derived!r}; expected a multiple of it, or leave {key} out")


AUTOENCODER_NAMES = {"x": "autoencoder", "audio": "audio_autoencoder"}
"""Generated stream (batch key) -> the name of its pretrained autoencoder in a latent cache's manifest
(``shards encode``) and in ``MediaSpec.made_with``."""


def by_autoencoder_name(per_stream: Mapping[str, T]) -> dict[str, T]:
    """Values per generated stream (``x``, ``audio``) -> per autoencoder name (``autoencoder``, ``audio_autoencoder``),
    in stream order: the one place the encoder of a latent cache and the model that trains on it name streams alike."""
    unknown = [key for key in per_stream if key not in AUTOENCODER_NAMES]
    if unknown:
        raise ValueError(f"stream {unknown[0]!r}: no latent-cache name for its autoencoder; expected a stream of "
                         f"{', '.join(AUTOENCODER_NAMES)}")
    return {AUTOENCODER_NAMES[key]: value for key, value in per_stream.items()}


@dataclass(frozen=True)
class TokenAxis:
    """How media along one axis (pixels of a side, frames of a clip, samples of a waveform) become tokens.

    The codec maps ``stride`` media steps to one latent step (adding ``extra`` latent steps), the
    tokenizer puts ``patch`` latent steps in a token: n media steps make
    ``(n // stride + extra) // patch`` tokens."""

    stride: int = 1
    """Media steps per latent step: the codec's spatial or temporal factor, or its hop (1: pixels, waveforms)."""
    patch: int = 1
    """Latent steps per token: the tokenizer's patch (tpatch along time)."""
    extra: int = 0
    """Latent steps the codec adds to n // stride (MelCodec's centred STFT: 1)."""
    causal: bool = False
    """The first step alone makes a latent step, then every ``stride`` (causal video autoencoders: Wan,
    LTX keep 1 + stride m frames and make 1 + m latent frames)."""

    @property
    def multiple(self) -> int:
        """Media steps per token: a length that is a multiple of it tokenizes whole."""
        return self.stride * self.patch

    def latent(self, n: int) -> int:
        """Latent steps of n media steps."""
        if self.causal:
            return 1 + (n - 1) // self.stride if n > 0 else 0
        return n // self.stride + self.extra

    def tokens(self, n: int) -> int:
        return self.latent(n) // self.patch

    def whole_latent(self, n: int) -> int:
        """Latent steps of the longest length up to n that tokenizes whole: whole patches only (0: none)."""
        return self.latent(n) // self.patch * self.patch

    def keep(self, n: int) -> int:
        """The longest length up to n that tokenizes whole (0: none does)."""
        if not self.causal:
            return n // self.multiple * self.multiple
        latent = self.latent(n) // self.patch * self.patch
        return 1 + self.stride * (latent - 1) if latent else 0

    def span(self, latent: int) -> int:
        """Media steps that ``latent`` latent steps decode to."""
        return 1 + self.stride * (latent - 1) if self.causal else latent * self.stride


@dataclass(frozen=True)
class MediaSpec:
    """The media a generator trains on and samples: sizes, granularities, rates, and what a token spans.

    Plain numbers (a transform carries it into dataloader workers). Fields a modality has no use
    for stay None or a unit axis."""

    size: int | None = None
    """Side in pixels of the images or video frames the model samples."""
    pixels: TokenAxis = TokenAxis()
    """Along image (frame) height and width; ``pixels.multiple`` = patch x the codec's spatial factor."""
    frames: int | None = None
    """Frames of the clips the model samples (the default longest clip kept for training)."""
    time: TokenAxis = TokenAxis()
    """Along video frames; ``time.multiple`` = tpatch x the codec's temporal factor."""
    fps: int | None = None
    """Frame rate of the clips."""
    sample_rate: int | None = None
    """Audio sample rate (Hz)."""
    samples: TokenAxis = TokenAxis()
    """Along an audio waveform; ``samples.stride`` is the codec's hop."""
    made_with: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Fingerprints of the pretrained models cached data must come from: per autoencoder name (``autoencoder``,
    ``audio_autoencoder``: ``by_autoencoder_name``) a str, and ``text_encoders`` (list, in order); empty without
    pretrained models."""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Field -> where the model takes it from (config keys), for error messages."""

    def source(self, name: str) -> str:
        return f"the model's {name} ({self.sources[name]})" if name in self.sources else f"the model's {name}"

    def image_tokens(self, height: int, width: int) -> int:
        return self.pixels.tokens(height) * self.pixels.tokens(width)

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        return self.time.tokens(frames) * self.image_tokens(height, width)

    def audio_tokens(self, samples: int) -> int:
        return self.samples.tokens(samples)


@runtime_checkable
class DescribesMedia(Protocol):
    """A LightningModule whose data transform follows it (every generator)."""

    def media_spec(self) -> MediaSpec: ...
