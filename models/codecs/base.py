"""What a generator asks of its first stage (codec): encode media to the latent the flow runs in, decode it
back, and the numbers its tokenizer and data derive from it. Declared here once, with the defaults of a
codec that changes nothing (pixels), instead of probed with getattr where they are used."""

from __future__ import annotations

from torch import Tensor, nn


class Codec(nn.Module):
    """Base of the first stages (Identity, MelCodec, ShapeLatents, PretrainedAutoencoder); picked in YAML by class_path."""

    latent_channels: int | None = None
    """Channels of the latent the tokenizer patches (its ``channels`` follow them); None: not a channel latent (sets)."""
    spatial_factor: int = 1
    """Media pixels per latent pixel along height and width."""
    temporal_factor: int = 1
    """Media frames per latent frame."""
    causal: bool = False
    """The first frame alone makes a latent frame, then every temporal_factor frames (Wan, LTX)."""
    hop: int = 1
    """Audio samples per latent frame."""
    extra_frames: int = 0
    """Latent frames beyond samples // hop (a centred STFT adds one)."""
    native_sample_rate: int | None = None
    """The audio rate a pretrained audio autoencoder runs at (the generator's rate follows it); None: any."""
    fingerprint: str | None = None
    """Of a pretrained codec's folder (recorded in checkpoints, checked against latent shards); None: nothing loaded."""

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def normalise(self, z: Tensor) -> Tensor:
        """Stored latents (``duoflow shards encode``) -> what ``encode`` returns; only pretrained autoencoders cache."""
        raise ValueError(f"the batch holds cached latents but the codec is {type(self).__name__}; set it to "
                         "models.codecs.pretrained.PretrainedAutoencoder (the autoencoder that encoded the shards)")
