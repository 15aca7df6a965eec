"""WebDataset pipelines and the LightningDataModule that serves them.

Training reads, in each epoch e, an endless stream: every pass over the shard list is a
permutation seeded by (seed, e, pass), the SAME on every rank and worker, and each (rank,
worker) takes every k-th shard of it. Nothing runs dry, so each rank yields exactly
``samples_per_epoch // (batch_size * world_size)`` batches per epoch however the shards are
sized, even with fewer shards than ranks x workers (they then share shards, with different
shuffle seeds). The pipeline, in order:

    endless shard permutations -> split by rank -> split by worker -> tar members -> samples
    -> shuffle buffer -> decode (allow-list) -> transform -> batch

Validation reads every shard once in order; rank r keeps samples r, r + world, ... so every
sample is seen exactly once across ranks.

Exact resume: the batches of epoch e are a pure function of (seed, e, rank, worker), so the
checkpoint stores only the epoch and the batches each worker has delivered to the training loop
(``state_dict``); a resumed run rebuilds that epoch and drops those batches (decoding them again:
the cost is bounded by one epoch, so keep ``samples_per_epoch`` moderate on huge data sets).
With 0 or 1 dataloader workers the batch order after a resume is the uninterrupted run's; with
more, the rest of the interrupted epoch has the same batches in another worker interleaving, and
later epochs are identical again. Random augmentations drawn inside workers are not replayed.

Bad samples (``BadSample``) and unreadable shards are skipped, counted and logged to
``logging.getLogger("duoflow.data")`` with their shard and key; past ``max_bad_fraction`` (counted
per dataloader worker of each rank) the run stops with one line naming the rank, worker and
the shards with the most bad samples.
"""

from __future__ import annotations

import collections
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
from typing import Any

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

    def __init__(self, urls: list[str], seed: int | str = 0):
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

    def __init__(self, bufsize: int, seed: int | str, rank: int):
        self.bufsize, self.seed, self.rank = bufsize, seed, rank

    def run(self, src: Iterable) -> Iterator:
        rng = random.Random(f"{self.seed}:{self.rank}:{_worker()[0]}")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class TooManyBadSamples(RuntimeError):
    """More than ``max_bad_fraction`` of the samples failed; the message names the worst shards."""


class SkipCounter:
    """Skip, count and log bad samples (``BadSample``) and unreadable shard data, per shard.

    Raises TooManyBadSamples once more than ``max_bad_fraction`` of at least ``min_seen`` samples
    were bad. Counts belong to one dataloader worker of one rank (each worker holds its own copy);
    the stop message says which, and names the shards with the most bad samples.
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_seen: int = 100, max_logged: int = 20, rank: int = 0):
        self.max_bad_fraction, self.min_seen, self.max_logged, self.rank = max_bad_fraction, min_seen, max_logged, rank
        self.good = self.bad = self.bad_shards = 0
        self.bad_by_shard: collections.Counter[str] = collections.Counter()

    def passed(self, src: Iterable) -> Iterator:
        """Stage after the last fallible stage: counts the samples that made it."""
        for sample in src:
            self.good += 1
            yield sample

    def map(self, fn) -> "SkipBad":
        """Stage applying ``fn`` to each sample, skipping (and counting) those that raise BadSample."""
        return SkipBad(fn, self)

    def bad_sample(self, exn: BadSample, shard: str = "?") -> None:
        self.bad += 1
        self.bad_by_shard[shard] += 1
        seen = self.good + self.bad
        if self.bad <= self.max_logged or self.bad % 1000 == 0:
            log.warning("skipped bad sample %s (%d of %d bad so far)", exn, self.bad, seen)
        if seen >= self.min_seen and self.bad > self.max_bad_fraction * seen:
            worst = ", ".join(f"{url} ({n})" for url, n in self.bad_by_shard.most_common(3))
            raise TooManyBadSamples(
                f"{self.bad} of {seen} samples were bad on rank {self.rank}, worker {_worker()[0]}, more than "
                f"max_bad_fraction={self.max_bad_fraction}; worst shards: {worst}; last: {exn}"
            ) from None

    def bad_shard(self, exn: Exception) -> bool:
        self.bad_shards += 1
        log.warning("skipped unreadable shard data: %s (%d so far)", " ".join(map(str, exn.args))[:300], self.bad_shards)
        return True


class SkipBad:
    """Pipeline stage: ``fn(sample)`` for each sample; BadSample -> counted against the sample's shard, skipped."""

    def __init__(self, fn, counter: SkipCounter):
        self.fn, self.counter = fn, counter

    def __call__(self, src: Iterable) -> Iterator:
        for sample in src:
            try:
                out = self.fn(sample)
            except BadSample as exn:
                self.counter.bad_sample(exn, str(sample.get("__url__", "?")))
                continue
            yield out


def budget_batched(src: Iterable[dict], batch_size: int, budget: int, cost) -> Iterator[dict]:
    """Stage: consecutive samples into batches of at most ``batch_size`` samples and ``budget`` cost.

    A batch closes when the next sample would pass either limit. A sample costing more than the
    budget alone still forms its own batch: nothing is dropped or cropped to fit."""
    batch: list[dict] = []
    used = 0
    for sample in src:
        c = cost(sample)
        if batch and (used + c > budget or len(batch) >= batch_size):
            yield collate(batch)
            batch, used = [], 0
        batch.append(sample)
        used += c
    # the training stream is endless: no partial last batch


class TrainStream:
    """One rank's endless training batches for one epoch: a pure function of (seed, epoch, rank, worker).

    Epoch e reads shard permutations seeded by (seed, e, pass) and a shuffle buffer seeded by
    (seed, e, rank, worker), so the batches after n consumed ones are known without any saved
    RNG state: resuming is "rebuild epoch e, drop n batches".
    """

    def __init__(self, urls: list[str], rank: int, world_size: int, transform, batch_size: int,
                 shuffle_buffer: int, seed: int, max_bad_fraction: float, batch_budget: int | None = None):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.batch_budget = batch_budget
        self.transform, self.batch_size, self.shuffle_buffer, self.seed = transform, batch_size, shuffle_buffer, seed
        self.skips = SkipCounter(max_bad_fraction, rank=rank)  # one per worker (each holds a copy)

    def batches(self, epoch: int) -> Iterator[dict]:
        seed = f"{self.seed}:{epoch}"
        return iter(wds.DataPipeline(
            [
                EndlessShardList(self.urls, seed=seed),
                split_by_rank(self.rank, self.world_size),
                wds.split_by_worker,
                wds.tarfile_to_samples(handler=self.skips.bad_shard),
                WorkerShuffle(self.shuffle_buffer, seed=seed, rank=self.rank),
                self.skips.map(decode_sample),
                self.skips.map(self.transform),
                self.skips.passed,
                self.batcher(),
            ]
        ))

    def batcher(self):
        if self.batch_budget is None:
            return wds.batched(self.batch_size, collation_fn=collate, partial=False)
        return functools.partial(budget_batched, batch_size=self.batch_size, budget=self.batch_budget,
                                 cost=self.transform.cost)


POSITION_KEY = "__pos__"
"""Batch field added by EpochBatches: LongTensor [epoch, worker, batches of this worker this epoch]."""


class EpochBatches(IterableDataset):
    """Exactly ``batches`` batches per epoch on this rank (split over dataloader workers).

    Epoch e of worker w is ``stream.batches(e)``: its first ``share(w)`` batches. Each batch carries
    its position (``POSITION_KEY``), so the main process knows exactly what the training loop took,
    even though workers prefetch. ``start`` resumes mid-epoch: ``{"epoch": e, "done": [n_w, ...]}``
    means epoch e with n_w batches of worker w already consumed; they are rebuilt and dropped.
    """

    def __init__(self, stream: TrainStream, batches: int, start: dict | None = None):
        super().__init__()
        self.stream, self.batches, self.start = stream, batches, start
        self._epoch: int | None = None  # epoch of the last __iter__ in this process (worker)

    def __len__(self) -> int:
        return self.batches

    def share(self, worker: int, workers: int) -> int:
        return self.batches // workers + (worker < self.batches % workers)

    def __iter__(self) -> Iterator:
        worker, workers = _worker()
        share = self.share(worker, workers)
        if self._epoch is None:  # the first epoch in this process: where the checkpoint left off
            start = self.start or {}
            epoch, done = int(start.get("epoch", 0)), list(start.get("done", []))
            done = min(done[worker], share) if worker < len(done) else 0
        else:
            epoch, done = self._epoch + 1, 0
        self._epoch = epoch
        stream = self.stream.batches(epoch)
        with torch.random.fork_rng(devices=[]):  # replaying consumed batches leaves the global RNG alone
            for _ in range(done):
                self._next(stream)
        for i in range(done, share):
            batch = self._next(stream)
            batch[POSITION_KEY] = torch.tensor([epoch, worker, i + 1])
            yield batch

    @staticmethod
    def _next(stream: Iterator) -> dict:
        try:
            return next(stream)
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
        batch_budget: Close a training batch before its summed sample cost passes this (the
            transform's ``cost``: tokens for images with ``multiple`` = patch size); ``batch_size``
            still caps the samples. For mixed sizes: small images come many to a batch, large ones
            few. An epoch stays ``samples_per_epoch // (batch_size * world_size)`` batches, so set
            ``batch_size`` to the samples a typical batch holds. None: fixed ``batch_size``.
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
        batch_budget: int | None = None,
    ):
        super().__init__()
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer <= 0 or (batch_budget is not None and batch_budget <= 0):
            raise ValueError(
                f"ShardDataModule: need batch_size > 0, num_workers >= 0, shuffle_buffer > 0, batch_budget > 0 or null; "
                f"got {batch_size}, {num_workers}, {shuffle_buffer}, {batch_budget}"
            )
        self.batch_budget = batch_budget
        self.train_shards, self.val_shards = train_shards, val_shards
        self.transform = transform if transform is not None else ImageTransform()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.samples_per_epoch, self.max_bad_fraction = samples_per_epoch, max_bad_fraction
        self._consumed: dict[int, tuple[int, int]] = {}  # worker -> (epoch, batches) the training loop took
        self._resume: dict[str, Any] = {}  # the data position loaded from a checkpoint

    def train_stream(self, urls: list[str], rank: int, world_size: int) -> TrainStream:
        """The endless training stream of batches for one rank (one epoch per ``batches(epoch)``)."""
        return TrainStream(urls, rank, world_size, self.transform, self.batch_size, self.shuffle_buffer, self.seed,
                           self.max_bad_fraction, self.batch_budget)

    def val_pipeline(self, urls: list[str], rank: int, world_size: int) -> wds.DataPipeline:
        """Every validation sample once across ranks, in shard order, last batch partial."""
        skips = SkipCounter(max_bad_fraction=1.0, rank=rank)
        return wds.DataPipeline(
            [
                wds.SimpleShardList(urls),
                wds.split_by_worker,
                wds.tarfile_to_samples(handler=skips.bad_shard),
                split_by_rank(rank, world_size),
                skips.map(decode_sample),
                skips.map(self.transform),
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
        # the loader's own generator: creating its iterator must not draw from the global torch RNG
        # (a resumed run creates one mid-epoch where the uninterrupted run did not)
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = dist_info()
        urls, batches = self.batches_per_rank(expand_shards(self.train_shards), world_size)
        start = self.resume_from(batches, world_size)
        self._consumed = {w: (start["epoch"], n) for w, n in enumerate(start["done"])} if start else {}
        return self._loader(EpochBatches(self.train_stream(urls, rank, world_size), batches, start))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        rank, world_size = dist_info()
        return self._loader(self.val_pipeline(expand_shards(self.val_shards), rank, world_size))

    # ---- the data position, saved in checkpoints (Lightning calls state_dict / load_state_dict) ----

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of each training batch the loop takes (and drop the field)."""
        if isinstance(batch, dict) and POSITION_KEY in batch:
            epoch, worker, done = batch.pop(POSITION_KEY).tolist()
            self._consumed[worker] = (epoch, done)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch of the training stream and batches consumed per dataloader worker in it.

        The same on every rank: ranks take equal batch counts, and a worker's batches arrive in a
        fixed round-robin order."""
        if not self._consumed:
            return {**self._resume} if self._resume else {}
        epoch = max(e for e, _ in self._consumed.values())
        workers = max(1, self.num_workers)
        done = [self._consumed[w][1] if w in self._consumed and self._consumed[w][0] == epoch else 0
                for w in range(workers)]
        return {"epoch": epoch, "done": done, "world_size": dist_info()[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def resume_from(self, batches: int, world_size: int) -> dict | None:
        """The stream position to start from: the loaded checkpoint's, moved to the next epoch when complete."""
        state = self._resume
        if not state:
            return None
        workers = max(1, self.num_workers)
        if len(state["done"]) != workers or state.get("world_size", world_size) != world_size:
            log.warning("checkpoint data position was taken with %d worker(s) x %d rank(s), now %d x %d: "
                        "starting the next epoch of the stream", len(state["done"]), state.get("world_size", 0),
                        workers, world_size)
            return {"epoch": state["epoch"] + 1, "done": [0] * workers}
        if sum(state["done"]) >= batches:  # the checkpoint was taken at the end of an epoch
            return {"epoch": state["epoch"] + 1, "done": [0] * workers}
        log.info("resuming the training stream at epoch %d after %d batches", state["epoch"], sum(state["done"]))
        return {"epoch": state["epoch"], "done": list(state["done"])}


def read_samples(shards: str | list[str], transform: SampleTransform, num: int) -> dict[str, Any]:
    """The first `num` samples of the shards (in shard order), transformed and batched into one dict."""
    data = ShardDataModule(shards, transform=transform, batch_size=min(256, num), num_workers=0)
    batches, n = [], 0
    for batch in data.val_pipeline(expand_shards(shards), rank=0, world_size=1):
        batches.append(batch)
        n += len(batch["__key__"])
        if n >= num:
            break
    if not batches:
        raise ValueError(f"shards {shards!r} hold no readable samples")
    out = {}
    for key, first in batches[0].items():
        parts = [b[key] for b in batches]
        out[key] = torch.cat(parts)[:num] if isinstance(first, torch.Tensor) else [v for p in parts for v in p][:num]
    return out
