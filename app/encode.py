"""`duoflow shards encode`: media shards -> latent shards, with a pretrained autoencoder and text encoders.

Every sample of the media shards is read as training reads it (the same transforms), encoded ONCE
by the frozen autoencoder (its raw latent, before normalisation) and, when text encoders are given,
its caption encoded by each of them; training then reads the stored latents and embeddings and never
runs the autoencoder or the text encoders on the training data again.

One output shard per input shard, named after it (``<stem>.tar``), so the work splits by shard:
rank r of a ``torchrun`` / Slurm job (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``)
encodes the input shards r, r + W, r + 2W, ..., never a sample twice. A shard is written under a
temporary name and renamed when complete; then its statistics; last, atomically, ``<stem>.done.json``:
a kill anywhere before leaves the shard to be encoded again, and a re-run skips the done shards and
never rewrites them. When every shard is done, whichever rank finishes last merges the per-shard
statistics into ``latent-stats.json`` (per-channel mean/std, the codec's ``stats``) and writes
``manifest.json`` (sources, options, autoencoder and text-encoder folders and fingerprints,
statistics, sample counts), ``index.json`` and ``classes.json``, each through a unique temporary file
and a rename, so two ranks finishing at once write the same content harmlessly.

Stored per sample: ``latent.npy`` (float32, the autoencoder's own latent; audio-video: plus
``audio_latent.npy`` from the audio autoencoder, with ``audio-latent-stats.json``), ``text.safetensors``
(``tokens_<i>`` (L_i, D_i) per encoder at the caption's true length, ``pooled`` (P,)), and the
source's ``cls``, ``txt``, ``json``. Bad samples (undecodable, too short, non-finite latents) are
skipped, counted and named in the log, as in training.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.encode_batches import KEPT_FIELDS, encode_in_batches
from app.errors import UserError
from datamodules.audio import AudioTransform
from datamodules.audiovideo import AudioVideoTransform
from datamodules.latents import LATENT_STREAMS, MANIFEST_NAME
from datamodules.media.files import atomic_write_text as write_atomic  # one name tests can replace
from datamodules.media.spec import MediaSpec, TokenAxis, by_autoencoder_name
from datamodules.shards import count_samples, expand_shards
from datamodules.transforms import ImageTransform, SampleTransform
from datamodules.video import VideoTransform
from datamodules.writers import CLASSES_NAME, INDEX_NAME, ShardWriter
from models.codecs.latent_stats import LatentStats
from models.codecs.pretrained import AudioMedia, PretrainedAutoencoder, VideoMedia
from models.text_encoders import TextEncoders, TextEncoderSpec

log = logging.getLogger("duoflow.encode")

STATS_NAME = "latent-stats.json"
STREAMS = tuple((key, field, {"x": STATS_NAME}.get(key, f"{key}-latent-stats.json"))
                for key, field in LATENT_STREAMS.items())
"""Batch key -> stored field and statistics file, per stream (the video's soundtrack is the second)."""


# ---------------------------------------------------------------- what runs where


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK/WORLD_SIZE, else Slurm's, else (0, 1)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(world):
            return int(os.environ.get(rank, "0")), int(os.environ[world])
    return 0, 1


def default_device() -> str:
    """The GPU of this rank (LOCAL_RANK / SLURM_LOCALID) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return f"cuda:{local % torch.cuda.device_count()}"


def my_shards(urls: list[str], rank: int, world: int) -> list[str]:
    """Input shards this rank encodes: every world-th, from its rank (disjoint, together all of them)."""
    return urls[rank::world]


def output_stem(url: str) -> str:
    return Path(url).name.removesuffix(".tar")


# ---------------------------------------------------------------- reading media as training does


def media_transform(codec: PretrainedAutoencoder, audio_codec: PretrainedAutoencoder | None, size: int,
                    keep_aspect: bool, max_frames: int, sample_rate: int | None, fps: int, max_seconds: float,
                    min_seconds: float) -> SampleTransform:
    """The transform of the codec's media kind (audio-video with an audio codec); sizes rounded to what
    the autoencoder needs, audio at the audio autoencoder's own rate."""
    media = codec.family.media
    # clips cut to frames the codec keeps whole (a causal one: 1 + k m), so a soundtrack is cut to the same span
    frames = MediaSpec(time=TokenAxis(stride=codec.temporal_factor, causal=codec.causal))
    if audio_codec is not None:
        if not isinstance(media, VideoMedia) or not isinstance(audio_codec.family.media, AudioMedia):
            raise UserError("--audio-autoencoder: expected a video --autoencoder and an audio --audio-autoencoder")
        transform = AudioVideoTransform(size=size, max_frames=max_frames, fps=fps,
                                        sample_rate=sample_rate or audio_codec.native_sample_rate)
        transform.follow(frames)
        return transform
    if isinstance(media, VideoMedia):
        transform = VideoTransform(size=size, max_frames=max_frames)
        transform.follow(frames)
        return transform
    if isinstance(media, AudioMedia):
        rate = sample_rate or codec.native_sample_rate
        if not rate:
            raise UserError("--sample-rate: the autoencoder's config names no sampling_rate; pass the rate it expects")
        return AudioTransform(sample_rate=rate, max_seconds=max_seconds, min_seconds=min_seconds)
    return ImageTransform(size=size, keep_aspect=keep_aspect, multiple=codec.spatial_factor)


# ---------------------------------------------------------------- encoding one shard


@dataclass
class ShardResult:
    samples: int = 0
    bad: list[str] = field(default_factory=list)
    stats: dict[str, LatentStats] = field(default_factory=dict)
    """Stored field -> statistics of its latents."""


class Encoder:
    """The frozen models and how a batch of transformed samples becomes stored latent samples."""

    def __init__(self, codecs: dict[str, PretrainedAutoencoder], text: TextEncoders | None, batch_size: int):
        self.codecs, self.text, self.batch_size = codecs, text, batch_size  # batch key -> its autoencoder

    def shape(self, sample: dict) -> tuple:
        """Samples batch together when every stream has the same shape."""
        return tuple(tuple(sample[key].shape) for key in self.codecs)

    def encode_batch(self, batch: list[tuple[dict, dict]], result: ShardResult) -> list[dict]:
        """Same-shaped samples -> the samples to store (non-finite latents counted as bad)."""
        fields = {key: field for key, field, _ in STREAMS}
        latents = {key: codec.encode_raw(torch.stack([s[key] for _, s in batch])).float().cpu()  # (B, C, ...)
                   for key, codec in self.codecs.items()}
        text = self.text.encode([s["txt"] for _, s in batch]) if self.text is not None else None
        per_encoder = [text.unpadded(j) for j in range(len(text.tokens))] if text is not None else []  # split once
        out = []
        for i, (decoded, sample) in enumerate(batch):
            zs = {fields[key]: z[i] for key, z in latents.items()}
            if not all(torch.isfinite(z).all() for z in zs.values()):
                msg = f"{decoded.get('__url__', '?')}:{sample['__key__']}: the autoencoder gave a non-finite latent"
                result.bad.append(msg)
                log.warning("encode: skipped bad sample %s", msg)
                continue
            stored = {"__key__": sample["__key__"], **{f: z.numpy() for f, z in zs.items()},
                      **{k: decoded[k] for k in KEPT_FIELDS if k in decoded}}
            if text is not None:
                tokens = {f"tokens_{j}": captions[i].cpu().numpy() for j, captions in enumerate(per_encoder)}
                stored["text.safetensors"] = {**tokens, "pooled": text.pooled[i].cpu().numpy()}
            for f, z in zs.items():
                result.stats.setdefault(f, LatentStats()).update(z[None])
            out.append(stored)
        result.samples += len(out)
        return out

    def encode_shard(self, url: str, out_dir: Path, transform: SampleTransform, bar: tqdm) -> ShardResult:
        """Encode one input shard into ``out_dir/<stem>.tar`` (+ its stats sidecar), atomically."""
        stem, result = output_stem(url), ShardResult()
        tmp_pattern = str(out_dir / f".{stem}.tmp-%06d.tar")
        with ShardWriter(tmp_pattern, maxcount=10**9, index=False) as writer:  # finalize writes index.json
            encode_in_batches([url], transform, self.shape, lambda batch: self.encode_batch(batch, result),
                              writer.write, self.batch_size, bar, result.bad)
        tmp = Path(tmp_pattern % 0)
        if result.samples == 0:  # nothing usable: no shard, the done file says why
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, out_dir / f"{stem}.tar")
        for key, stored_field, _ in STREAMS:
            if key in self.codecs and result.samples:
                result.stats[stored_field].save(str(out_dir / f"{stem}.{key}.stats.json"))
        # last, atomically: a shard counts as done only once its tar and statistics are in place, so a kill
        # anywhere before leaves it to be encoded again by the next run
        write_atomic(out_dir / f"{stem}.done.json", json.dumps({"source": url, "samples": result.samples,
                                                                 "bad": result.bad}, indent=1) + "\n")
        return result


def media_options(transform: SampleTransform) -> dict[str, Any]:
    """The media the shards hold, as the transform made them (checked against the model at training)."""
    keys = ("size", "keep_aspect", "max_frames", "fps", "sample_rate", "max_seconds")
    return {k: getattr(transform, k) for k in keys if isinstance(getattr(transform, k, None), (int, float, bool))}


JOB_NAME = "encode-job.json"


def same_job(out_dir: Path, job: dict[str, Any]) -> None:
    """Record what OUT is encoded with (inputs, options, model fingerprints) at the first run; a re-run
    (a resume, another rank) with anything else is refused in one line rather than mixing two encodings."""
    path = out_dir / JOB_NAME
    if not path.is_file():
        write_atomic(path, json.dumps(job, indent=1) + "\n")
        return
    recorded = json.loads(path.read_text())
    differ = [key for key in sorted(set(recorded) | set(job)) if recorded.get(key) != job.get(key)]
    if differ:
        raise UserError(f"{out_dir} holds an encode with other {', '.join(differ)} ({path}); re-run it with the same "
                        "source, options and models to resume, or encode into a new folder")


def is_done(out_dir: Path, url: str) -> bool:
    return (out_dir / f"{output_stem(url)}.done.json").is_file()


# ---------------------------------------------------------------- the whole job


def describe(codec: PretrainedAutoencoder) -> dict:
    return {"class": type(codec.autoencoder).__name__, "path": codec.path, "subfolder": codec.subfolder,
            "fingerprint": codec.fingerprint, "sample": codec.sample}


def finalize(out_dir: Path, urls: list[str], codecs: dict[str, PretrainedAutoencoder], text: TextEncoders | None,
             specs: list[TextEncoderSpec], options: dict[str, Any]) -> dict:
    """Merge the per-shard statistics and write the stats files, index.json, classes.json and manifest.json."""
    stats = {key: LatentStats() for key in codecs}
    shards, bad = {}, 0
    for url in urls:
        stem = output_stem(url)
        done = json.loads((out_dir / f"{stem}.done.json").read_text())
        bad += len(done["bad"])
        if done["samples"]:
            shards[f"{stem}.tar"] = done["samples"]
            for key in codecs:
                stats[key].merge(LatentStats.load(str(out_dir / f"{stem}.{key}.stats.json"))[0])
    if not shards:
        raise UserError(f"shards encode: no usable samples in the {len(urls)} input shard(s) (see the warnings above)")
    latent_stats = {}
    for key, _, stats_name in STREAMS:
        if key in codecs:
            stats[key].save(str(out_dir / stats_name), fingerprint=codecs[key].fingerprint)
            mean, std = stats[key].result()
            latent_stats[key] = {"file": stats_name, "mean": mean.tolist(), "std": std.tolist()}
    write_atomic(out_dir / INDEX_NAME, json.dumps({"shards": shards}, indent=1) + "\n")
    classes = Path(urls[0]).parent / CLASSES_NAME
    if classes.is_file():
        write_atomic(out_dir / CLASSES_NAME, classes.read_text())
    manifest = {
        "sources": urls,
        "options": options,
        **by_autoencoder_name({key: describe(codec) for key, codec in codecs.items()}),
        "text_encoders": [
            {"path": s.path, "subfolder": s.subfolder, "tokenizer_subfolder": s.tokenizer_subfolder, "kind": e.kind,
             "max_length": s.max_length, "layer": s.layer, "fingerprint": e.fingerprint}
            for s, e in zip(specs, text.encoders if text is not None else [])
        ],
        "latent_stats": latent_stats,
        "samples": sum(shards.values()), "bad_samples": bad, "shards": shards,
    }
    write_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def parse_text_encoder(spec: str) -> TextEncoderSpec:
    """``PATH`` or ``PATH,key=value,...`` (keys of TextEncoderSpec: subfolder, tokenizer_subfolder, kind,
    max_length, dtype, layer) -> a TextEncoderSpec."""
    path, *options = spec.split(",")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("subfolder", "tokenizer_subfolder", "kind", "max_length", "dtype", "layer"):
            raise UserError(f"--text-encoder {spec!r}: {option!r}; expected key=value with key in subfolder, "
                            "tokenizer_subfolder, kind, max_length, dtype, layer")
        kwargs[key] = int(value) if key in ("max_length", "layer") else value
    return TextEncoderSpec(path, **kwargs)


def input_shards(src: str, out_dir: Path, codec: PretrainedAutoencoder, shard_size: int, world: int) -> list[str]:
    """SRC's shards; a folder of media files (no .tar) is sharded first into OUT/media with the writers."""
    if os.path.isdir(src) and not glob.glob(os.path.join(src, "*.tar")):
        if world > 1:
            raise UserError(f"{src}: a folder of media files; with {world} ranks shard it first (`duoflow shards "
                            "images|audio SRC SHARDS`) so that every rank reads the same shards")
        media = codec.family.media
        target = str(out_dir / "media")
        if isinstance(media, VideoMedia):
            raise UserError(f"{src}: a folder of video files; shard it first (`duoflow shards synthetic video` writes "
                            "video shards) and pass the shards")
        if isinstance(media, AudioMedia):
            from datamodules.audio import write_audio_folder

            return write_audio_folder(src, target, shard_size=shard_size)
        from datamodules.writers import write_image_folder

        return write_image_folder(src, target, shard_size=shard_size)
    return expand_shards(src)


def encode_shards(src: str, out: str, autoencoder: str, subfolder: str | None = None, dtype: str = "float32",
                  text_encoders: list[TextEncoderSpec] | None = None, size: int = 256, keep_aspect: bool = False,
                  max_frames: int = 17, sample_rate: int | None = None, max_seconds: float = 10.0,
                  min_seconds: float = 0.1, batch_size: int = 16, shard_size: int = 1000, device: str | None = None,
                  progress: bool = True, audio_autoencoder: str | None = None, audio_subfolder: str | None = None,
                  fps: int = 8) -> dict | None:
    """Encode this rank's share of SRC into OUT; returns the manifest when this rank finished the job."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or default_device()
    codec = PretrainedAutoencoder(autoencoder, subfolder=subfolder, dtype=dtype).to(device)
    audio_codec = (PretrainedAutoencoder(audio_autoencoder, subfolder=audio_subfolder, dtype=dtype).to(device)
                   if audio_autoencoder else None)
    codecs = {"x": codec, **({"audio": audio_codec} if audio_codec is not None else {})}
    specs = list(text_encoders or [])
    text = TextEncoders(specs).to(device) if specs else None
    rank, world = rank_and_world()
    urls = input_shards(src, out_dir, codec, shard_size, world)
    names = [output_stem(u) for u in urls]
    if len(set(names)) != len(names):
        raise UserError(f"{src}: two input shards share a file name; output shards are named after their inputs")
    for stale in out_dir.glob(".*.tmp-*.tar"):  # a killed run's half shard of one of ours: redone below
        if any(stale.name.startswith(f".{output_stem(u)}.tmp-") for u in my_shards(urls, rank, world)):
            stale.unlink()
    transform = media_transform(codec, audio_codec, size, keep_aspect, max_frames, sample_rate, fps, max_seconds,
                                min_seconds)
    same_job(out_dir, {"sources": names, "options": media_options(transform),
                       **by_autoencoder_name({key: codec.fingerprint for key, codec in codecs.items()}),
                       "text_encoders": text.fingerprints if text is not None else []})
    todo = [u for u in my_shards(urls, rank, world) if not is_done(out_dir, u)]
    total = sum(count_samples(todo).values()) if todo else 0
    log.info("encode: rank %d/%d, %d of %d input shards to do (%d samples) on %s", rank, world, len(todo),
             len(urls), total, device)
    encoder = Encoder(codecs, text, batch_size)
    start = time.perf_counter()
    with tqdm(total=total, desc=f"encode (rank {rank})", unit="sample", disable=not progress) as bar:
        for url in todo:
            encoder.encode_shard(url, out_dir, transform, bar)
    if todo:
        log.info("encode: rank %d encoded %d samples in %.1f s (%.1f samples/s)", rank, total,
                 time.perf_counter() - start, total / max(time.perf_counter() - start, 1e-9))
    if all(is_done(out_dir, u) for u in urls):  # the last rank to finish writes the manifest
        return finalize(out_dir, urls, codecs, text, specs, media_options(transform))
    return None


def run(args: argparse.Namespace) -> list[str]:
    specs = [parse_text_encoder(s) for s in args.text_encoder]
    manifest = encode_shards(
        args.src, args.out, args.autoencoder, subfolder=args.subfolder, dtype=args.dtype, text_encoders=specs,
        size=args.size, keep_aspect=args.keep_aspect, max_frames=args.max_frames, sample_rate=args.sample_rate,
        max_seconds=args.max_seconds, min_seconds=args.min_seconds, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device, audio_autoencoder=args.audio_autoencoder,
        audio_subfolder=args.audio_subfolder, fps=args.fps)
    if manifest is None:
        print(f"this rank is done; other ranks are still encoding into {args.out}")
        return []
    print(f"{manifest['samples']} samples ({manifest['bad_samples']} bad, skipped) in {len(manifest['shards'])} shards; "
          f"manifest: {Path(args.out) / MANIFEST_NAME}")
    return [str(Path(args.out) / name) for name in manifest["shards"]]
