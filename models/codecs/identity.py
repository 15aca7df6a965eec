"""The first stage for data trained in its own space (pixels in [-1, 1])."""

from __future__ import annotations

from torch import Tensor

from models.codecs.base import Codec


class Identity(Codec):
    """Encode and decode are the identity; has no parameters, so nothing is saved for it."""

    latent_channels = 3  # RGB pixels

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z
