"""The image feature network for sample-quality metrics, trained by us on the real training split.

Letters: B batch, C channels, S image side, W width, K classes.

FID-style metrics need a fixed embedding. Inception-v3 weights would be a download, and its
features know nothing about 16-pixel digits or shapes; instead each data set gets a small CNN
classifier trained here, on the REAL TRAINING shards only (never on generated samples, never on
the held-out split the metrics compare against). Its penultimate embedding feeds the Fréchet
distance and k-NN precision/recall; its logits give the classification accuracy score (CAS:
accuracy on generated samples labelled with the class they were conditioned on; Ravuri &
Vinyals 2019 use the reverse direction, the idea is the same). Metrics are comparable only
between evaluations with the same feature net, so it is saved next to the training shards as
``feature-net.pt`` (state dict + meta, loadable with ``weights_only=True``) and reused while
its meta (classes, size, steps, seed, shard names and sizes) still matches.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from app.evaluation.metrics import accuracy
from datamodules.media.files import atomic_write
from datamodules.shards import expand_shards, read_samples
from datamodules.transforms import ImageTransform, SampleTransform

log = logging.getLogger("duoflow.eval")

FILE_NAME = "feature-net.pt"
MAX_TRAIN_SAMPLES = 50_000
"""Training images held in memory at most (plenty for a 16-32 px classifier)."""


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FeatureNet(nn.Module):
    """Small CNN: three stages (W, 2W, 4W channels, each halving the side), global average pool.

    Works at any input side >= 4; `meta` records how it was trained (the size it expects)."""

    def __init__(self, num_classes: int, channels: int = 3, width: int = 32):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"FeatureNet: num_classes={num_classes}; expected at least 2 classes")
        self.body = nn.Sequential(
            conv_block(channels, width), conv_block(width, width),
            conv_block(width, 2 * width, stride=2), conv_block(2 * width, 2 * width),
            conv_block(2 * width, 4 * width, stride=2), conv_block(4 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, num_classes)
        self.meta: dict[str, Any] = {"num_classes": num_classes, "channels": channels, "width": width}

    def features(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [-1, 1] -> (B, 4W) penultimate embedding (post-ReLU average, as Inception's pool3)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, K) class logits."""
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """(features (B, 4W), logits (B, K)) in eval mode, in batches, on the net's device."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        feats, logits = [], []
        for chunk in x.split(batch_size):
            f = self.features(chunk.to(device).float())
            feats.append(f.cpu())
            logits.append(self.head(f).cpu())
        self.train(was_training)
        return torch.cat(feats), torch.cat(logits)


# ---------------------------------------------------------------- training on real shards


def as_frames(x: Tensor | list[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """Images (N, 3, S, S) as they are; video clips (3, T, S, S), a batch or a list of different
    lengths, as their frames, each labelled with its clip's class."""
    if isinstance(x, Tensor) and x.ndim == 4:
        return x, labels
    frames = [clip.transpose(0, 1) for clip in x]  # each (T, 3, S, S)
    return torch.cat(frames), torch.cat([label.repeat(len(f)) for label, f in zip(labels, frames)])


def read_images(shards: str | list[str], size: int, limit: int = MAX_TRAIN_SAMPLES,
                transform: SampleTransform | None = None) -> tuple[Tensor, Tensor]:
    """Up to `limit` images of the shards, in shard order: ((N, 3, size, size) in [-1, 1], (N,) labels).

    `transform` reads the samples (default ImageTransform(size)); clips give their frames (as_frames)."""
    samples = read_samples(shards, transform or ImageTransform(size=size), limit)
    x, labels = as_frames(samples["x"], samples["cls"])
    return x[:limit], labels[:limit]


def shard_signature(shards: str | list[str]) -> list[list]:
    """[name, bytes] of each shard: changes when the data is rewritten, so a stale net is retrained."""
    return [[Path(u).name, os.path.getsize(u) if os.path.isfile(u) else -1] for u in expand_shards(shards)]


def random_shift(x: Tensor, gen: torch.Generator, pixels: int = 1) -> Tensor:
    """Translate the batch by up to `pixels` in each direction (edge padding): cheap augmentation."""
    s = x.shape[-1]
    dy, dx = (int(v) for v in torch.randint(0, 2 * pixels + 1, (2,), generator=gen))
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    return padded[..., dy : dy + s, dx : dx + s]


def fit_feature_net(
    x: Tensor, labels: Tensor, num_classes: int, steps: int = 300, seed: int = 0, width: int = 32,
    batch_size: int = 64, lr: float = 3e-3, device: str | torch.device = "cpu", progress: bool = True,
) -> FeatureNet:
    """Train a FeatureNet on images (N, C, S, S) in [-1, 1] with labels (N,): AdamW, cosine decay.

    Deterministic for a given seed (initialisation and batches come from seeded generators)."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"feature net: labels span {int(labels.min())}..{int(labels.max())}; "
                         f"expected class ids 0..{num_classes - 1} (the cls field of every training sample)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(num_classes, channels=x.shape[1], width=width).to(device)
    x, labels = x.to(device), labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    net.train()
    for _ in tqdm(range(steps), desc="feature net", unit="step", disable=not progress):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen).to(device)
        loss = F.cross_entropy(net(random_shift(x[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net = net.cpu().eval()
    _, logits = net.embed(x.cpu())
    net.meta.update(size=x.shape[-1], steps=steps, seed=seed, train_samples=len(x),
                    train_accuracy=accuracy(logits, labels.cpu()))
    return net


def train_feature_net(shards: str | list[str], num_classes: int, size: int, steps: int = 300, seed: int = 0,
                      width: int = 32, device: str | torch.device = "cpu", progress: bool = True,
                      transform: SampleTransform | None = None) -> FeatureNet:
    """A FeatureNet trained on the real images (or video frames) of `shards` (the training split) at
    `size` pixels (returned on the CPU)."""
    x, labels = read_images(shards, size, transform=transform)
    net = fit_feature_net(x, labels, num_classes, steps=steps, seed=seed, width=width, device=device, progress=progress)
    net.meta["shards"] = shard_signature(shards)
    log.info("feature net: %d training images, %d steps, train accuracy %.3f",
             len(x), steps, net.meta["train_accuracy"])
    return net


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    """State dict + meta (plain types only: loadable with weights_only=True); written atomically."""
    atomic_write(path, lambda tmp: torch.save({"state_dict": net.state_dict(), "meta": net.meta}, tmp))


def load_feature_net(path: str | Path) -> FeatureNet:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved["meta"]
    net = FeatureNet(meta["num_classes"], meta["channels"], meta["width"])
    net.load_state_dict(saved["state_dict"])
    net.meta = dict(meta)
    return net.eval()


def feature_net_for(shards: str | list[str], num_classes: int, size: int, steps: int = 300, seed: int = 0,
                    width: int = 32, path: str | Path | None = None, device: str | torch.device = "cpu",
                    progress: bool = True, transform: SampleTransform | None = None) -> FeatureNet:
    """The feature net of a training split, trained once and reused.

    Default `path`: `feature-net.pt` next to the shards, reused while its meta matches every
    argument, else retrained and overwritten. An explicit existing `path` is used as it is (only
    classes and size must match), so a set of evaluations can pin one net."""
    explicit = path is not None
    path = Path(path) if explicit else Path(expand_shards(shards)[0]).parent / FILE_NAME
    wanted = {"num_classes": num_classes, "size": size, "steps": steps, "seed": seed, "width": width,
              "shards": shard_signature(shards)}
    if path.is_file():
        net = load_feature_net(path)
        if explicit:
            got = (net.meta.get("num_classes"), net.meta.get("size"))
            if got != (num_classes, size):
                raise ValueError(f"feature net {path}: made for {got[0]} classes at {got[1]} px; "
                                 f"expected {num_classes} classes at {size} px")
            return net
        stale = [k for k, v in wanted.items() if net.meta.get(k) != v]
        if not stale:
            log.info("feature net: reusing %s", path)
            return net
        log.info("feature net %s was made for other %s: training a new one", path, ", ".join(stale))
    net = train_feature_net(shards, num_classes, size, steps=steps, seed=seed, width=width, device=device,
                            progress=progress, transform=transform)
    try:
        save_feature_net(net, path)
        log.info("feature net saved to %s", path)
    except OSError as e:  # read-only data folder: the metrics still work, the net is just not reused
        log.warning("feature net not saved to %s (%s); it will be trained again next time", path, e)
    return net
