"""The training stream: one rank's endless, resumable batches from WebDataset shards.

Training reads, in each epoch e, an endless stream: every pass over the shard list is a
permutation seeded by (seed, e, pass), the SAME on every rank and worker, and each (rank,
worker) takes every k-th shard of it. Nothing runs dry, so each rank yields exactly
``samples_per_epoch // (batch_size * world_size)`` batches per epoch however the shards are
sized, even with fewer shards than ranks x workers (they then share shards, with different
shuffle seeds). The pipeline, in order:

    endless shard permutations -> split by rank -> split by worker -> tar members -> samples
    -> shuffle buffer -> decode (allow-list) -> transform -> batch (fixed size or a token budget)

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
import itertools
import logging
import random
from collections.abc import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.decoders import BadSample, decode_sample
from datamodules.transforms import collate

log = logging.getLogger("duoflow.data")


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

    Each bad sample is named once (the first ``max_logged`` of them), not again when a later epoch
    meets it; every one is counted.

    Raises TooManyBadSamples once more than ``max_bad_fraction`` of at least ``min_seen`` samples
    were bad. Counts belong to one dataloader worker of one rank (each worker holds its own copy);
    the stop message says which, and names the shards with the most bad samples.
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_seen: int = 100, max_logged: int = 20, rank: int = 0):
        self.max_bad_fraction, self.min_seen, self.max_logged, self.rank = max_bad_fraction, min_seen, max_logged, rank
        self.good = self.bad = self.bad_shards = 0
        self.bad_by_shard: collections.Counter[str] = collections.Counter()
        self.logged: set[str] = set()  # a bad sample is named once, not again in every epoch

    def passed(self, src: Iterable) -> Iterator:
        """Stage after the last fallible stage: counts the samples that made it."""
        for sample in src:
            self.good += 1
            yield sample

    def map(self, fn) -> SkipBad:
        """Stage applying ``fn`` to each sample, skipping (and counting) those that raise BadSample."""
        return SkipBad(fn, self)

    def bad_sample(self, exn: BadSample, shard: str = "?") -> None:
        self.bad += 1
        self.bad_by_shard[shard] += 1
        seen = self.good + self.bad
        where = str(exn).split(": ", 1)[0]  # "<shard>:<key>" (the BadSample convention)
        if where not in self.logged and (len(self.logged) < self.max_logged or self.bad % 1000 == 0):
            self.logged.add(where)
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
