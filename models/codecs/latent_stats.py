"""Per-channel latent normalisation: the math, and the statistics it is measured with.

A pretrained autoencoder's latents are shifted and scaled per channel so the flow sees about
zero mean and unit variance: ``z_norm = (z - mean) / std``. The numbers come from statistics
measured over the encoded training data (``LatentStats``, saved beside the shards as JSON) or
from the autoencoder's config; whichever is used, training and sampling must use the same ones.

``LatentStats`` streams: float64 sums per channel, combined batch by batch with Chan et al.'s
pairwise update, so statistics measured on two ranks (or two encoding jobs) merge exactly into
those of the union. ``std`` is the population standard deviation (divides by the count).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from datamodules.media.files import atomic_write_text


def _per_channel(v: Tensor, z: Tensor, channel_dim: int) -> Tensor:
    """(C,) -> a view of v that broadcasts along ``channel_dim`` of z, in z's dtype and device."""
    shape = [1] * z.ndim
    shape[channel_dim] = -1
    return v.to(device=z.device, dtype=z.dtype).view(shape)


def normalise(z: Tensor, mean: Tensor, std: Tensor, channel_dim: int = 1) -> Tensor:
    """(z - mean) / std per channel; mean and std are (C,)."""
    return (z - _per_channel(mean, z, channel_dim)) / _per_channel(std, z, channel_dim)


def denormalise(z: Tensor, mean: Tensor, std: Tensor, channel_dim: int = 1) -> Tensor:
    """The inverse of ``normalise``: z * std + mean per channel."""
    return z * _per_channel(std, z, channel_dim) + _per_channel(mean, z, channel_dim)


class LatentStats:
    """Streaming per-channel mean and std of latents, mergeable across ranks.

    Args:
        channel_dim: The channel axis of the tensors given to ``update``.
    """

    def __init__(self, channel_dim: int = 1):
        self.channel_dim = channel_dim
        self.count = 0
        self.mean: Tensor | None = None  # (C,) float64
        self.m2: Tensor | None = None  # (C,) float64, sum of squared deviations from the mean

    def update(self, z: Tensor) -> LatentStats:
        """Add every element of z (any shape with channels at ``channel_dim``) to its channel."""
        x = z.detach().movedim(self.channel_dim, 0).reshape(z.shape[self.channel_dim], -1).double()  # (C, N)
        mean = x.mean(dim=1)
        batch = LatentStats(self.channel_dim)
        batch.count, batch.mean, batch.m2 = x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(dim=1)
        return self.merge(batch)

    def merge(self, other: LatentStats) -> LatentStats:
        """Fold ``other`` in, in place: the result is the statistics of both sets (Chan et al. 1979)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            return self
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"LatentStats.merge: {other.mean.numel()} channels, expected {self.mean.numel()}")
        other_mean, other_m2 = other.mean.to(self.mean.device), other.m2.to(self.mean.device)
        n = self.count + other.count
        delta = other_mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other_m2 + delta**2 * (self.count * other.count / n)
        self.count = n
        return self

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean, std), both (C,) float64."""
        if self.count == 0:
            raise ValueError("LatentStats.result: no latents were added (call update first)")
        return self.mean.clone(), (self.m2 / self.count).sqrt()

    def save(self, path: str, fingerprint: str | None = None) -> None:
        """Write ``{"count", "mean", "std", "fingerprint"}`` JSON atomically (temporary file, rename).

        ``fingerprint`` is the autoencoder's (``PretrainedAutoencoder.fingerprint``), so a codec
        refuses statistics measured with another model. count and std restore the sums exactly
        enough to merge saved statistics later (``load`` then ``merge``).
        """
        mean, std = self.result()
        data = {"count": self.count, "mean": mean.tolist(), "std": std.tolist(), "fingerprint": fingerprint}
        atomic_write_text(path, json.dumps(data, indent=1))  # two ranks may save the same merged file at once

    @classmethod
    def load(cls, path: str) -> tuple[LatentStats, str | None]:
        """Statistics saved by ``save`` and the fingerprint they were measured with."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"latent stats file {path!r} does not exist; expected the JSON written by LatentStats.save")
        data = json.loads(Path(path).read_text())
        missing = [k for k in ("count", "mean", "std") if k not in data]
        if missing or len(data["mean"]) != len(data["std"]) or int(data["count"]) <= 0:
            raise ValueError(f"latent stats file {path!r}: expected a positive count and equal-length mean and std lists")
        stats = cls()
        std = torch.tensor(data["std"], dtype=torch.float64)
        stats.count, stats.mean, stats.m2 = int(data["count"]), torch.tensor(data["mean"], dtype=torch.float64), std**2 * int(data["count"])
        return stats, data.get("fingerprint")
