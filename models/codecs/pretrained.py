"""Frozen pretrained autoencoders (diffusers) as first stages for images, video and audio.

Letters: B batch, C latent channels, T frames, H/W height/width, S audio samples,
f spatial factor, k temporal factor, hop samples per latent frame.

    image (B, 3, H, W) in [-1, 1]    -> (B, C, H/f, W/f)           AutoencoderKL (SD3/Flux), AutoencoderDC
    video (B, 3, T, H, W) in [-1, 1] -> (B, C, 1 + (T-1)/k, H/f, W/f)   AutoencoderKLWan, AutoencoderKLLTXVideo
    audio (B, S) mono in [-1, 1]     -> (B, C, S/hop)               AutoencoderOobleck (Stable Audio)

Causal video autoencoders encode the first frame alone, then k frames per latent frame (Wan:
1 + 4k frames -> 1 + k). Inputs are cropped to whole strides first (the largest H, W multiple
of f; 1 + (T-1)//k*k frames; S//hop*hop samples), as the tokenizer crops to whole patches.
Mono audio is copied to each of the model's ``audio_channels`` on encode, its output channels
averaged on decode. ``decode`` returns the decoder's output as is (not clamped: writers clamp).

``encode`` returns normalised latents ``(z - mean) / std`` per channel and ``decode`` takes
them; mean and std come from a stats file measured over the encoded data, else the config
(Wan's ``latents_mean``/``latents_std``; SD3/Flux's ``(z - shift_factor) * scaling_factor``).
They are persistent buffers: the generator checkpoint carries them, so sampling uses the very
numbers training used. The autoencoder's weights are not in the checkpoint (``FrozenModules``);
its folder and ``fingerprint`` are, for ``check_fingerprint``.

What differs between autoencoder classes is a ``Family``: media layout, geometry, how the
latent is read from the encoder output, and where the config keeps its normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch
from torch import Tensor, nn

from datamodules.media.spec import agree
from models.codecs.base import Codec
from models.codecs.latent_stats import LatentStats, denormalise, normalise
from models.pretrained_files import (
    FrozenModules,
    check_fingerprint,
    folder_fingerprint,
    model_folder,
    no_autocast,
    read_config,
    torch_dtype,
)


@dataclass(frozen=True)
class Geometry:
    channels: int
    """C: latent channels."""
    spatial: int = 1
    """f: pixels per latent pixel along H and W."""
    temporal: int = 1
    """k: frames per latent frame after the first."""
    hop: int = 1
    """Audio samples per latent frame."""


class ImageMedia:
    """(..., 3, H, W) images."""

    def crop(self, x: Tensor, g: Geometry) -> Tensor:
        h, w = x.shape[-2] // g.spatial * g.spatial, x.shape[-1] // g.spatial * g.spatial
        if h == 0 or w == 0:
            raise ValueError(f"PretrainedAutoencoder: {x.shape[-2]}x{x.shape[-1]} pixels, expected at least {g.spatial} per side")
        return x[..., :h, :w]

    def latent_shape(self, shape: tuple[int, ...], g: Geometry) -> tuple[int, ...]:
        return (*shape[:-3], g.channels, shape[-2] // g.spatial, shape[-1] // g.spatial)

    def to_model(self, x: Tensor, model: nn.Module) -> Tensor:
        return x

    def from_model(self, x: Tensor) -> Tensor:
        return x


class VideoMedia(ImageMedia):
    """(..., 3, T, H, W) clips; 1 + k * n frames (causal first frame)."""

    def crop(self, x: Tensor, g: Geometry) -> Tensor:
        if x.shape[-3] == 0:
            raise ValueError("PretrainedAutoencoder: a clip with 0 frames, expected at least 1")
        return super().crop(x[..., : 1 + (x.shape[-3] - 1) // g.temporal * g.temporal, :, :], g)

    def latent_shape(self, shape: tuple[int, ...], g: Geometry) -> tuple[int, ...]:
        frames = 1 + (shape[-3] - 1) // g.temporal
        return (*shape[:-4], g.channels, frames, shape[-2] // g.spatial, shape[-1] // g.spatial)


class AudioMedia:
    """(..., S) mono waveforms; the model sees (B, audio_channels, S)."""

    def crop(self, x: Tensor, g: Geometry) -> Tensor:
        if x.shape[-1] < g.hop:
            raise ValueError(f"PretrainedAutoencoder: {x.shape[-1]} samples, expected at least hop={g.hop}")
        return x[..., : x.shape[-1] // g.hop * g.hop]

    def latent_shape(self, shape: tuple[int, ...], g: Geometry) -> tuple[int, ...]:
        return (*shape[:-1], g.channels, shape[-1] // g.hop)

    def to_model(self, x: Tensor, model: nn.Module) -> Tensor:
        return x[:, None, :].expand(-1, model.config.audio_channels, -1)  # (B, A, S)

    def from_model(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)  # (B, A, S) -> (B, S)


def gaussian_latent(model: nn.Module, x: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
    posterior = model.encode(x).latent_dist
    return posterior.sample(generator=generator) if sample else posterior.mode()


def deterministic_latent(model: nn.Module, x: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
    return model.encode(x).latent


Normalisation = tuple[list[float], list[float], str]  # mean, std, where they come from


def scaled_normalisation(model: nn.Module, channels: int) -> Normalisation:
    """SD3/Flux: z_norm = (z - shift_factor) * scaling_factor, the same for every channel."""
    shift, scale = model.config.get("shift_factor") or 0.0, model.config.get("scaling_factor") or 1.0
    return [float(shift)] * channels, [1.0 / float(scale)] * channels, "config shift_factor/scaling_factor"


def wan_normalisation(model: nn.Module, channels: int) -> Normalisation:
    return list(model.config.latents_mean), list(model.config.latents_std), "config latents_mean/latents_std"


def ltx_normalisation(model: nn.Module, channels: int) -> Normalisation:
    """LTX keeps per-channel statistics as buffers in its weights: (z - mean) * scaling_factor / std."""
    std = model.latents_std.double() / float(model.config.scaling_factor)
    return model.latents_mean.tolist(), std.tolist(), "weights latents_mean/latents_std, config scaling_factor"


@dataclass(frozen=True)
class Family:
    media: ImageMedia | VideoMedia | AudioMedia
    geometry: Callable[[nn.Module], Geometry]
    latent: Callable[[nn.Module, Tensor, bool, torch.Generator | None], Tensor]
    normalisation: Callable[[nn.Module, int], Normalisation]
    stochastic: bool = True
    """False for deterministic autoencoders (no posterior to sample)."""


FAMILIES: dict[str, Family] = {
    "AutoencoderKL": Family(
        ImageMedia(), lambda m: Geometry(m.config.latent_channels, spatial=2 ** (len(m.config.block_out_channels) - 1)),
        gaussian_latent, scaled_normalisation,
    ),
    "AutoencoderDC": Family(
        ImageMedia(), lambda m: Geometry(m.config.latent_channels, spatial=m.spatial_compression_ratio),
        deterministic_latent, scaled_normalisation, stochastic=False,
    ),
    "AutoencoderKLWan": Family(
        VideoMedia(),
        lambda m: Geometry(
            m.config.z_dim, spatial=2 ** (len(m.config.dim_mult) - 1) * (m.config.patch_size or 1),
            temporal=2 ** sum(m.config.temperal_downsample),
        ),
        gaussian_latent, wan_normalisation,
    ),
    "AutoencoderKLLTXVideo": Family(
        VideoMedia(),
        lambda m: Geometry(m.config.latent_channels, spatial=m.spatial_compression_ratio, temporal=m.temporal_compression_ratio),
        gaussian_latent, ltx_normalisation,
    ),
    "AutoencoderOobleck": Family(
        AudioMedia(), lambda m: Geometry(m.config.decoder_input_channels, hop=m.hop_length), gaussian_latent, scaled_normalisation,
    ),
}


class PretrainedAutoencoder(FrozenModules, Codec):
    """A diffusers autoencoder from a local folder as a frozen first stage; its class from config.json
    (the arguments are documented on ``__init__``, which the CLI reads). Latents come out in float32."""

    def __init__(
        self,
        path: str,
        subfolder: str | None = None,
        dtype: str = "float32",
        tiling: bool = False,
        slicing: bool = False,
        sample: bool = False,
        stats: str | None = None,
        fingerprint: str | None = None,
    ):
        """
        Args:
            path: Folder written by save_pretrained, a pipeline folder (with subfolder), or package:NAME.
            subfolder: The autoencoder's sub-folder in a pipeline folder (SD3/Flux/Wan: "vae").
            dtype: Weights' dtype: float32, bfloat16 or float16.
            tiling: Encode/decode large inputs tile by tile (less memory, seams blended).
            slicing: Encode/decode a batch one sample at a time (less memory).
            sample: Draw latents from the posterior (else its mean: deterministic encodes, exact caching).
            stats: Latent statistics file written by `duoflow shards encode` (per-channel mean/std of
                the encoded data); None = the autoencoder config's normalisation.
            fingerprint: Expected fingerprint of the folder (a generator checkpoint records it, so
                sample/evaluate stop with one line if the folder changed); None = not checked.
        """
        super().__init__()
        folder = model_folder(path, subfolder)
        found = check_fingerprint(path, subfolder, fingerprint) if fingerprint else None
        name = read_config(folder, " by diffusers (an autoencoder)").get("_class_name")
        if name not in FAMILIES:
            raise ValueError(f"PretrainedAutoencoder: {str(folder)!r} holds {name!r}; expected one of {', '.join(FAMILIES)}")
        self.family, self.path, self.subfolder, self.sample = FAMILIES[name], path, subfolder, sample
        if sample and not self.family.stochastic:
            raise ValueError(f"PretrainedAutoencoder: sample=True, but {name} is deterministic; expected sample=False")
        self.fingerprint = found or folder_fingerprint(folder)
        model = getattr(diffusers, name).from_pretrained(
            str(model_folder(path)), subfolder=subfolder, torch_dtype=torch_dtype(dtype, "PretrainedAutoencoder"), local_files_only=True,
        )
        for enabled, switch in ((tiling, "tiling"), (slicing, "slicing")):
            if enabled:
                try:
                    getattr(model, f"enable_{switch}")()
                except NotImplementedError:
                    raise ValueError(f"PretrainedAutoencoder: {name} has no {switch}; expected {switch}=False") from None
        self.hold(model)  # not a submodule: not in state_dict, parameters() or the optimizer
        self.geometry = self.family.geometry(model)
        mean, std, self.normalisation_source = self.stats_normalisation(stats) if stats else self.family.normalisation(model, self.geometry.channels)
        if len(mean) != self.geometry.channels or len(std) != self.geometry.channels or min(std) <= 0:
            raise ValueError(
                f"PretrainedAutoencoder: {self.normalisation_source} gives {len(mean)} means and {len(std)} stds "
                f"(min std {min(std, default=0)}); expected {self.geometry.channels} of each, stds > 0"
            )
        # persistent: the generator checkpoint keeps the numbers it was trained with
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.tensor(std, dtype=torch.float32))

    @property
    def autoencoder(self) -> nn.Module:
        """The diffusers model (held, not a submodule)."""
        return self._held[0]

    def stats_normalisation(self, stats: str) -> Normalisation:
        """Mean and std from a ``LatentStats.save`` file measured with this very autoencoder."""
        measured, fingerprint = LatentStats.load(stats)
        if fingerprint is not None and fingerprint.split("-")[:2] != self.fingerprint.split("-")[:2]:
            raise ValueError(
                f"latent stats file {stats!r} was measured with autoencoder {fingerprint}, but "
                f"{str(model_folder(self.path, self.subfolder))!r} is {self.fingerprint}; re-measure the stats with this autoencoder"
            )
        mean, std = measured.result()
        return mean.tolist(), std.tolist(), f"stats {stats}"

    # --- geometry, for the tokenizer ---
    @property
    def latent_channels(self) -> int:
        return self.geometry.channels

    @property
    def spatial_factor(self) -> int:
        return self.geometry.spatial

    @property
    def temporal_factor(self) -> int:
        return self.geometry.temporal

    @property
    def causal(self) -> bool:
        """Video autoencoders here encode the first frame alone, then temporal_factor frames per latent frame."""
        return isinstance(self.family.media, VideoMedia) and self.geometry.temporal > 1

    @property
    def hop(self) -> int:
        return self.geometry.hop

    @property
    def native_sample_rate(self) -> int | None:
        """The audio rate the autoencoder was trained at (its config's sampling_rate); None for images and video."""
        rate = self.autoencoder.config.get("sampling_rate") if isinstance(self.family.media, AudioMedia) else None
        return int(rate) if rate else None

    def at_rate(self, sample_rate: int, key: str) -> PretrainedAutoencoder:
        """Itself, when the generator's ``sample_rate`` is the autoencoder's: a pretrained audio
        autoencoder runs at the rate it was trained at. ``key``: the codec's config key."""
        agree("model.sample_rate", sample_rate, self.native_sample_rate or sample_rate,
              f"the autoencoder's sampling_rate ({key}: its config.json)")
        return self

    def latent_shape_for(self, media_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """The shape ``encode`` returns for media of ``media_shape`` (batch dims kept, crop included)."""
        return self.family.media.latent_shape(tuple(media_shape), self.geometry)

    # --- normalisation ---
    def normalisation(self) -> dict:
        """The per-channel numbers encode/decode use, and where they come from (for manifests)."""
        return {
            "mean": self.latent_mean.tolist(), "std": self.latent_std.tolist(),
            "source": self.normalisation_source, "fingerprint": self.fingerprint,
        }

    def normalise(self, z: Tensor) -> Tensor:
        return normalise(z, self.latent_mean, self.latent_std, channel_dim=1)

    def denormalise(self, z: Tensor) -> Tensor:
        return denormalise(z, self.latent_mean, self.latent_std, channel_dim=1)

    # --- encode / decode ---
    @torch.no_grad()
    def encode_raw(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Media -> the autoencoder's own latent (not normalised), in the buffers' dtype."""
        model, media = self.autoencoder, self.family.media
        x = media.to_model(media.crop(x, self.geometry).to(self.device, model.dtype), model)
        with no_autocast(x.device):
            return self.family.latent(model, x, self.sample, generator).to(self.latent_mean.dtype)

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        """The autoencoder's own latent -> media, in the buffers' dtype."""
        model = self.autoencoder
        with no_autocast(self.device):
            decoded = model.decode(z.to(self.device, model.dtype)).sample
        return self.family.media.from_model(decoded).to(self.latent_mean.dtype)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Media -> normalised latent (what the flow is trained on)."""
        return self.normalise(self.encode_raw(x, generator))

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent -> media."""
        return self.decode_raw(self.denormalise(z.to(self.latent_mean.dtype)))

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{type(self.autoencoder).__name__} from {str(model_folder(self.path, self.subfolder))!r}, "
            f"channels={g.channels}, spatial={g.spatial}, temporal={g.temporal}, hop={g.hop}, "
            f"fingerprint={self.fingerprint}, normalisation={self.normalisation_source!r}"
        )

