"""Reading latent shards written by ``duoflow shards encode``: cached latents and caption embeddings.

A latent sample holds ``latent.npy`` (the autoencoder's own latent, float32, channels first),
optionally ``audio_latent.npy`` (audio-video), ``text.safetensors`` (``tokens_<i>`` (L_i, D_i) per
text encoder, ``pooled`` (P,)) and the usual ``cls`` / ``txt`` / ``json``. The transform hands
them on as ``x_latent`` (and ``audio_latent``), ``txt_tokens`` (the per-encoder token states) and
``txt_pooled``; the generator normalises the latents with its codec's statistics and the text
condition uses the embeddings as they are. Nothing is decoded by a model here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datamodules.decoders import BadSample
from datamodules.media.spec import AUTOENCODER_NAMES
from datamodules.transforms import SampleTransform

LATENT_STREAMS = {"x": "latent.npy", "audio": "audio_latent.npy"}
"""Generated stream -> the shard field of its cached latents (`shards encode` writes them, this module reads them)."""
LATENT_FIELDS = {field: f"{stream}_latent" for stream, field in LATENT_STREAMS.items()}
"""Stored field -> batch key, per generated stream."""
MANIFEST_NAME = "manifest.json"
MODEL_KEYS = {"autoencoder": "model.codec", "audio_autoencoder": "model.audio_codec",
              "text_encoders": "model.conditioning.init_args.encoders"}
"""What `shards encode` records making the shards -> the config key of the model's counterpart."""


def as_tensor(value: object, where: str) -> torch.Tensor:
    """A finite float array -> float32 tensor, else BadSample naming where."""
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
        raise BadSample(f"{where}: expected a float array, got {getattr(value, 'dtype', type(value).__name__)}")
    if not np.isfinite(value).all():
        raise BadSample(f"{where}: holds NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


class CachedLatents(SampleTransform):
    """A latent sample -> ``x_latent`` [+ ``audio_latent``] and, when stored, ``txt_tokens`` / ``txt_pooled``.

    Args:
        audio: Also read ``audio_latent.npy`` (audio-video latent shards).
        text: Require cached caption embeddings (``text.safetensors``); a model conditioned on a
            pretrained text encoder trains on them. False reads them when present.
    """

    def __init__(self, audio: bool = False, text: bool = False):
        self.fields = [f for f in LATENT_FIELDS if audio or f == "latent.npy"]
        self.text = text

    def __call__(self, decoded: dict) -> dict:
        out = {}
        for field in self.fields:
            if field not in decoded:
                raise BadSample(f"{self.where(decoded)}: missing {field}; expected latent shards from `duoflow shards encode`")
            out[LATENT_FIELDS[field]] = as_tensor(decoded[field], f"{self.where(decoded)}: {field}")
        embeddings = decoded.get("text.safetensors")
        if embeddings is None and self.text:
            raise BadSample(f"{self.where(decoded)}: missing text.safetensors; encode the shards with --text-encoder")
        if embeddings is not None:
            where = f"{self.where(decoded)}: text.safetensors"
            n = len([k for k in embeddings if k.startswith("tokens_")])
            if "pooled" not in embeddings or any(f"tokens_{i}" not in embeddings for i in range(n)):
                raise BadSample(f"{where}: expected tokens_0.. and pooled, found {sorted(embeddings)}")
            out["txt_tokens"] = [as_tensor(embeddings[f"tokens_{i}"], where) for i in range(n)]
            out["txt_pooled"] = as_tensor(embeddings["pooled"], where)
        return {**out, **self.conditioning(decoded)}

    def check_shards(self, urls: list[str]) -> None:
        """The shards' manifest (written by ``shards encode``) against the model: latents from another
        autoencoder, embeddings from other text encoders (or another order), or clips at another frame
        or sample rate would train silently wrong, so each is one line naming both sides."""
        manifest_path = Path(urls[0]).parent / MANIFEST_NAME
        if "://" in urls[0] or not manifest_path.is_file():
            return
        manifest = json.loads(manifest_path.read_text())
        made = {name: (manifest.get(name) or {}).get("fingerprint") for name in AUTOENCODER_NAMES.values()}
        made["text_encoders"] = [e.get("fingerprint") for e in manifest.get("text_encoders") or []] or None
        for name, wanted in self.spec.made_with.items():
            if made.get(name) is not None and made[name] != wanted:
                raise ValueError(f"{manifest_path}: the shards were made with {name} {made[name]}, but the model's "
                                 f"({MODEL_KEYS[name]}) is {wanted}; re-encode the shards or point the model at the "
                                 "models that made them")
        options = manifest.get("options") or {}
        for name in ("fps", "sample_rate"):
            stated, model = options.get(name), getattr(self.spec, name)
            if stated is not None and model is not None and stated != model:
                raise ValueError(f"{manifest_path}: the shards hold {name}={stated}, the model's {name} is {model} "
                                 f"(model.{name}); re-encode with --{name.replace('_', '-')} {model} or set model.{name}")

    def cost(self, sample: dict) -> int:
        """Tokens of the sample: its cached latents' (latent steps along each axis over the tokenizer's
        patch: the autoencoder already ran) plus its caption's, which are packed into the sequence too."""
        total = 0
        for key in LATENT_FIELDS.values():
            if key not in sample:
                continue
            dims = sample[key].shape[1:]  # channels first
            axes = {1: [self.spec.samples], 2: [self.spec.pixels] * 2, 3: [self.spec.time] + [self.spec.pixels] * 2}
            if len(dims) not in axes:
                raise BadSample(f"{key}: latent of shape {tuple(sample[key].shape)}; expected (C, F), (C, H, W) or (C, T, H, W)")
            tokens = 1
            for n, axis in zip(dims, axes[len(dims)]):
                tokens *= n // axis.patch
            total += tokens
        return total + sum(len(t) for t in sample.get("txt_tokens", []))  # caption tokens are packed in too
