"""WebDataset pipelines and the LightningDataModule that serves them.

Training reads an endless stream: every pass over the shard list is a new seeded
permutation, the SAME on every rank and worker, and each (rank, worker) takes every k-th shard
of it. Nothing runs dry, so each rank yields exactly ``samples_per_epoch // (batch_size *
world_size)`` batches per epoch however the shards are sized, even with fewer shards than
ranks x workers (they then share shards, with different shuffle seeds). The stream carries on
across epochs where it stopped. The pipeline, in order:

    endless shard permutations -> split by rank -> split by worker -> tar members -> samples
    -> shuffle buffer -> decode (allow-list) -> transform -> batch

Validation reads every shard once in order; rank r keeps samples r, r + world, ... so every
sample is seen exactly once across ranks.

Bad samples (``BadSample``) and unreadable shards are skipped, counted and logged to
``logging.getLogger("duoflow.data")``; past ``max_bad_fraction`` the run stops with one line.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import logging
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from datamodules.decoders import BadSample, decode_sample
from datamodules.transforms import ImageTransform, SampleTransform, collate
from datamodules.writers import INDEX_NAME

log = logging.getLogger("duoflow.data")


# ---------------------------------------------------------------- shard lists


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, globs, directories (their ``*.tar``) or lists of these -> existing shard files.

    Remote URLs (``pipe:...``, ``s3://...``) pass through unchecked.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    missing: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            if _is_remote(url):
                urls.append(url)
            elif os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"shard folder {url!r} (from {spec!r}) holds no *.tar files")
                urls.extend(found)
            elif glob.has_magic(url):
                found = sorted(p for p in glob.glob(url) if os.path.isfile(p))
                if not found:
                    raise FileNotFoundError(f"no shard matches {url!r} (from {spec!r}); expected tar files")
                urls.extend(found)
            elif not os.path.isfile(url):
                missing.append(url)
            else:
                urls.append(url)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) from {spec!r} do not exist: {shown}; expected tar files")
    if not urls:
        raise ValueError(f"shard spec {spec!r} is empty; expected a pattern such as 'data/img-{{000000..000009}}.tar'")
    return urls


def count_tar_samples(path: str) -> int:
    """Samples in one tar: runs of members with the same key, as ``tarfile_to_samples`` groups them."""
    count, last = 0, None
    with tarfile.open(path, mode="r:*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _ = base_plus_ext(info.name)
            name = os.path.basename(info.name)
            if key is None or (name.startswith("__") and name.endswith("__")):
                continue
            if key != last:
                count, last = count + 1, key
    return count


def count_samples(urls: list[str]) -> dict[str, int]:
    """Sample count per shard, from ``index.json`` next to the shards when listed there, else from the tar headers."""
    indexes: dict[Path, dict[str, int]] = {}
    counts = {}
    for url in urls:
        folder = Path(url).parent
        if folder not in indexes:
            index_path = folder / INDEX_NAME
            indexes[folder] = json.loads(index_path.read_text()).get("shards", {}) if index_path.exists() else {}
        name = Path(url).name
        counts[url] = indexes[folder][name] if name in indexes[folder] else count_tar_samples(url)
    return counts


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ---------------------------------------------------------------- pipeline stages


class EndlessShardList(IterableDataset):
    """Yields ``{"url": ...}`` forever: pass c is the shard list permuted with seed (seed, c), identical everywhere."""

    def __init__(self, urls: list[str], seed: int = 0):
        super().__init__()
        self.urls, self.seed = list(urls), seed

    def __iter__(self) -> Iterator[dict]:
        for cycle in itertools.count():
            order = list(self.urls)
            random.Random(f"{self.seed}:{cycle}").shuffle(order)
            yield from ({"url": url} for url in order)


def _take_every(src: Iterable, rank: int, world_size: int) -> Iterator:
    return itertools.islice(src, rank, None, world_size)


def split_by_rank(rank: int, world_size: int):
    """Stage keeping items rank, rank + world_size, ... (shards for training, samples for validation)."""
    return functools.partial(_take_every, rank=rank, world_size=world_size)


class WorkerShuffle(wds.PipelineStage):
    """``wds.shuffle`` with an RNG seeded by (seed, rank, worker), created in the worker."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank = bufsize, seed, rank

    def run(self, src: Iterable) -> Iterator:
        rng = random.Random(f"{self.seed}:{self.rank}:{_worker()[0]}")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class SkipCounter:
    """Error policy for the ``handler=`` of webdataset stages: skip, count and log bad samples and shards.

    Raises RuntimeError once more than ``max_bad_fraction`` of at least ``min_seen`` samples were bad.
    Counts are per dataloader worker.
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_seen: int = 100, max_logged: int = 20):
        self.max_bad_fraction, self.min_seen, self.max_logged = max_bad_fraction, min_seen, max_logged
        self.good = self.bad = self.bad_shards = 0

    def passed(self, src: Iterable) -> Iterator:
        """Stage after the last fallible stage: counts the samples that made it."""
        for sample in src:
            self.good += 1
            yield sample

    def bad_sample(self, exn: Exception) -> bool:
        if not isinstance(exn, BadSample):
            return False  # not bad data but a bug: raise_unexpected re-raises it
        self.bad += 1
        seen = self.good + self.bad
        if self.bad <= self.max_logged or self.bad % 1000 == 0:
            log.warning("skipped bad sample %s (%d of %d bad so far)", exn, self.bad, seen)
        if seen >= self.min_seen and self.bad > self.max_bad_fraction * seen:
            raise RuntimeError(
                f"{self.bad} of {seen} samples were bad, more than max_bad_fraction={self.max_bad_fraction}; last: {exn}"
            ) from exn
        return True

    def bad_shard(self, exn: Exception) -> bool:
        self.bad_shards += 1
        log.warning("skipped unreadable shard data: %s (%d so far)", " ".join(map(str, exn.args))[:300], self.bad_shards)
        return True


def _accept_or_raise(exn: Exception, handler) -> bool:
    if handler(exn):
        return True
    raise exn


def raise_unexpected(handler):
    """Wrap a handler so that exceptions it does not accept are re-raised, not silently end the stream."""
    return functools.partial(_accept_or_raise, handler=handler)


class EpochBatches(IterableDataset):
    """Exactly ``batches`` items per epoch (split over dataloader workers) from an endless pipeline.

    The pipeline iterator persists across epochs (in the worker when workers are persistent),
    so an epoch starts where the previous one stopped.
    """

    def __init__(self, pipeline: Iterable, batches: int):
        super().__init__()
        self.pipeline, self.batches = pipeline, batches
        self._stream: Iterator | None = None

    def __len__(self) -> int:
        return self.batches

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}

    def __iter__(self) -> Iterator:
        worker, workers = _worker()
        share = self.batches // workers + (worker < self.batches % workers)
        if self._stream is None:
            self._stream = iter(self.pipeline)
        for _ in range(share):
            try:
                yield next(self._stream)
            except StopIteration:
                raise RuntimeError("the endless training pipeline stopped; are all shards empty?") from None


# ---------------------------------------------------------------- the datamodule


class ShardDataModule(lightning.LightningDataModule):
    """WebDataset shards -> batches, with the same number of batches on every rank.

    Args:
        train_shards: Brace pattern, glob, folder or list, e.g. ``data/img-{000000..000099}.tar``.
        val_shards: Same for validation; None means no validation loader.
        transform: Decoded sample -> tensors (``class_path`` in YAML); default ``ImageTransform()``.
        batch_size: Samples per batch on each rank.
        num_workers: Dataloader worker processes per rank (0 = in the main process).
        shuffle_buffer: Samples held in each worker's shuffle buffer.
        seed: Seed for the shard order and the shuffle buffers.
        samples_per_epoch: Samples per epoch over all ranks; None counts the train shards.
        max_bad_fraction: Stop when more than this fraction of samples fail to decode.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        transform: SampleTransform | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        max_bad_fraction: float = 0.05,
    ):
        super().__init__()
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer <= 0:
            raise ValueError(
                f"ShardDataModule: need batch_size > 0, num_workers >= 0, shuffle_buffer > 0; "
                f"got {batch_size}, {num_workers}, {shuffle_buffer}"
            )
        self.train_shards, self.val_shards = train_shards, val_shards
        self.transform = transform if transform is not None else ImageTransform()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.samples_per_epoch, self.max_bad_fraction = samples_per_epoch, max_bad_fraction

    def train_pipeline(self, urls: list[str], rank: int, world_size: int) -> wds.DataPipeline:
        """The endless training stream of batches for one rank."""
        skips = SkipCounter(self.max_bad_fraction)
        skip_bad = raise_unexpected(skips.bad_sample)
        return wds.DataPipeline(
            [
                EndlessShardList(urls, seed=self.seed),
                split_by_rank(rank, world_size),
                wds.split_by_worker,
                wds.tarfile_to_samples(handler=skips.bad_shard),
                WorkerShuffle(self.shuffle_buffer, seed=self.seed, rank=rank),
                wds.map(decode_sample, handler=skip_bad),
                wds.map(self.transform, handler=skip_bad),
                skips.passed,
                wds.batched(self.batch_size, collation_fn=collate, partial=False),
            ]
        )

    def val_pipeline(self, urls: list[str], rank: int, world_size: int) -> wds.DataPipeline:
        """Every validation sample once across ranks, in shard order, last batch partial."""
        skips = SkipCounter(max_bad_fraction=1.0)
        skip_bad = raise_unexpected(skips.bad_sample)
        return wds.DataPipeline(
            [
                wds.SimpleShardList(urls),
                wds.split_by_worker,
                wds.tarfile_to_samples(handler=skips.bad_shard),
                split_by_rank(rank, world_size),
                wds.map(decode_sample, handler=skip_bad),
                wds.map(self.transform, handler=skip_bad),
                skips.passed,
                wds.batched(self.batch_size, collation_fn=collate, partial=True),
            ]
        )

    def batches_per_rank(self, urls: list[str], world_size: int) -> tuple[list[str], int]:
        """(shards worth reading, batches per epoch per rank)."""
        samples = self.samples_per_epoch
        if samples is None:
            if any(_is_remote(u) for u in urls):
                raise ValueError(f"cannot count samples in remote shards {self.train_shards!r}; set samples_per_epoch")
            counts = count_samples(urls)
            urls = [u for u in urls if counts[u] > 0]
            samples = sum(counts.values())
            if samples == 0:
                raise ValueError(f"train shards {self.train_shards!r} hold no samples")
        batches = samples // (self.batch_size * world_size)
        if batches == 0:
            raise ValueError(
                f"samples_per_epoch={samples} is less than batch_size*world_size={self.batch_size * world_size}; "
                "expected at least one batch per rank"
            )
        return urls, batches

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = dist_info()
        urls, batches = self.batches_per_rank(expand_shards(self.train_shards), world_size)
        return self._loader(EpochBatches(self.train_pipeline(urls, rank, world_size), batches))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        rank, world_size = dist_info()
        return self._loader(self.val_pipeline(expand_shards(self.val_shards), rank, world_size))
