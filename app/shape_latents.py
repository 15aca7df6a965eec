"""Pre-encode shape shards to latent shards with a trained shape autoencoder (for ShapeFlow).

Each output sample keeps the source's key, ``cls``, ``txt``, ``json`` and its full
``points.npy`` (the metrics compare generated shapes with these), and adds ``latent.npy``:
float32 (K, d), the posterior mean divided by the codec's ``latent_scale`` (what
``ShapeCodec.encode`` returns, about unit variance; ``ShapeCodec.decode`` takes it back).
Encoding is deterministic: the first ``points`` stored surface points, no posterior noise.
``<out>/encoder.json`` records the checkpoint, latent shape and scale.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.encode_batches import KEPT_FIELDS, encode_in_batches
from datamodules.decoders import BadSample
from datamodules.media.files import atomic_write_text
from datamodules.shapes import checked_array
from datamodules.shards import count_samples, expand_shards
from datamodules.transforms import SampleTransform
from datamodules.writers import CLASSES_NAME, ShardWriter, write_classes
from models.codecs.shape import load_shape_codec


def surface_points(decoded: dict, points: int | None) -> np.ndarray:
    """A shape sample's surface points (N, 3), the first ``points`` of them (None: all); BadSample when unusable."""
    where = SampleTransform.where(decoded)
    pts = checked_array(decoded, "points.npy", where, (None, 3))
    if len(pts) == 0:
        raise BadSample(f"{where}: points.npy is empty")
    return pts[:points] if points else pts


@torch.no_grad()
def encode_shape_shards(
    ckpt: str, src: str, out: str, batch_size: int = 64, shard_size: int = 1000, points: int | None = None,
    prefix: str = "latent", device: str = "cpu", progress: bool = True,
) -> list[str]:
    """Encode every shape sample of ``src`` (pattern, glob or folder of shards) with the autoencoder in
    ``ckpt``; write ``<out>/<prefix>-%06d.tar`` (plus classes.json when ``src`` has one). Returns the shard paths.

    points: surface points given to the encoder, the first ones stored (None = all of them); samples are
    batched while their point counts agree.
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"encode_shape_shards: no such checkpoint {ckpt!r}; expected a ShapeAutoencoder .ckpt")
    codec = load_shape_codec(ckpt).to(device)
    urls = expand_shards(src)
    classes = Path(urls[0]).parent / CLASSES_NAME
    if classes.is_file():
        write_classes(out, json.loads(classes.read_text()))
    total = sum(count_samples(urls).values()) if all(os.path.isfile(u) for u in urls) else None  # for the progress bar

    def encode_batch(batch: list[tuple[dict, np.ndarray]]) -> list[dict]:
        x = torch.from_numpy(np.stack([p for _, p in batch]).astype(np.float32)).to(device)  # (B, N, 3)
        latents = codec.encode(x).float().cpu().numpy()  # (B, K, d)
        return [{"__key__": decoded["__key__"], "latent.npy": z,
                 "points.npy": np.asarray(decoded["points.npy"], np.float32),
                 **{k: decoded[k] for k in KEPT_FIELDS if k in decoded}} for (decoded, _), z in zip(batch, latents)]

    bad: list[str] = []  # each also named in the log as it comes
    with (ShardWriter(os.path.join(out, f"{prefix}-%06d.tar"), maxcount=shard_size) as writer,
          tqdm(total=total, desc="encode shapes", unit="shape", disable=not progress) as bar):
        encode_in_batches(urls, partial(surface_points, points=points), np.shape, encode_batch, writer.write,
                          batch_size, bar, bad)
    if not writer.paths:
        raise ValueError(f"encode_shape_shards: no usable shape samples in {src!r} ({len(bad)} bad, see the warnings above)")
    meta = {"checkpoint": str(Path(ckpt).resolve()), "latents": codec.cfg.latents, "latent_dim": codec.cfg.latent_dim,
            "latent_scale": float(codec.latent_scale)}
    atomic_write_text(Path(out) / "encoder.json", json.dumps(meta, indent=1) + "\n")
    return writer.paths
