"""The shape autoencoder's sizes (its own module, so checkpoint loading can allow it without importing the
network; models/codecs/shape.py re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShapeAEConfig:
    latents: int = 64
    """K: latent vectors per shape."""
    latent_dim: int = 8
    """d: channels of each latent vector (the flow generates K x d numbers)."""
    width: int = 128
    """C: transformer width."""
    heads: int = 4
    enc_self_layers: int = 1
    """Self-attention blocks on the latents after the encoder's cross-attention."""
    dec_layers: int = 2
    """Self-attention blocks on the latents before the query points read them."""
    fourier_bands: int = 8
    """Octaves of sin/cos features of the coordinates, frequencies pi * 2^0 .. pi * 2^(bands-1)."""
    mlp_ratio: float = 4.0
    kl_weight: float = 1e-3
    """Weight of the KL term (mean per latent element); 0 = deterministic bottleneck (no noise, no KL)."""
    chunk: int = 32768
    """Query points decoded at a time by ``decode`` (bounds memory on large grids)."""

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"ShapeAEConfig: width={self.width} must be divisible by heads={self.heads}")
        if min(self.latents, self.latent_dim, self.fourier_bands, self.chunk) <= 0 or self.kl_weight < 0:
            raise ValueError("ShapeAEConfig: latents, latent_dim, fourier_bands and chunk must be positive, kl_weight >= 0")
