"""The training stream: one rank's resumable batches from WebDataset shards, epoch by epoch.

Epochs (the arithmetic is ``datamodules/epochs.py``). Pass p over the data set is the shard list
permuted with seed (seed, p), the same on every rank and worker; the passes, concatenated, are one
endless sample sequence, and epoch e is its window ``[e*S, e*S + M)``: ``S = samples_per_epoch``
(default: the data set's size, so epoch e is pass e), ``M = batches * world_size * batch_size``,
``batches = S // (world_size * batch_size)`` per rank. The window is cut into contiguous ranges, one
per reader (rank, dataloader worker), each read through a shuffle buffer seeded by (seed, e,
layout, reader). A reader opens only the shards its range touches and reads past the members
before its range without decoding them. The pipeline of one reader, in order:

    its range's shard slices -> tar members -> samples -> shuffle buffer -> [then a spill stream]
    -> position count -> decode (allow-list) -> transform -> batch (fixed size or a token budget)

What holds (local shards, whose sample counts come from ``index.json`` or the tar headers):
- every rank yields exactly ``batches`` batches per epoch, however the shards are sized, even with
  fewer shards than readers (they then read disjoint parts of a shard);
- fixed ``batch_size`` and no bad samples: an epoch delivers every sample of its window exactly once
  over all ranks and workers; when ``S`` is the data set's size and a multiple of ``world_size *
  batch_size``, that is every sample of the data set once. Otherwise the last ``S - M`` samples of
  the window (fewer than ``world_size * batch_size``) are not used in that epoch;
- a reader that runs out of its range (bad samples skipped, a shard shorter than counted) goes on in
  a spill stream (every k-th shard of endless passes): those samples may repeat;
- ``batch_budget``: a batch may hold fewer than ``batch_size`` samples, so a reader may stop before its
  range ends: no sample repeats within an epoch, but the last ones of each range may go unseen.

Exact resume. Each batch carries its reader's position (``POSITION_KEY``: the samples of its order
used, bad ones included), so the main process knows what the training loop took however the
workers prefetch. The checkpoint (``ShardDataModule.state_dict``) holds the epoch, the batches per
worker, every reader's position (gathered from all ranks), the world size, and the layouts the
epoch had before earlier resumes on other sizes ("history").
- Same ranks x workers: each reader rebuilds its order and skips its used positions, read but not
  decoded. With 0 or 1 dataloader workers the batches after a resume are the uninterrupted run's
  (losses bit-identical); with more, the same batches in another worker interleaving (the loader
  restarts at worker 0). Later epochs are identical again.
- Other ranks x workers (R x W -> R' x W'): the old readers' remainders, each in its own order,
  concatenated in reader order, are cut into R' equal parts of whole batches, each part into its W'
  workers' shares. Over the epoch every sample of the window is then delivered once (fixed batches,
  no bad samples) but for fewer than ``R' * batch_size`` that fill no batch on every rank: dropped,
  and their number logged. The order after the resume is a pure function of the checkpoint and
  (R', W'); a further resume on yet another size chains the same way; the next epoch starts fresh in
  the new layout. With ``batch_budget``: no sample repeats across the resume, the unreached tails
  as above.
- Replay cost: no decoding; a reader reads (raw tar bytes) the base ranges its part comes from, up
  to its part's end: at most about one epoch of reading in all, spread over the readers. Keep
  ``samples_per_epoch`` moderate on huge data sets.
- Remote shards (``pipe:``, ``s3://``: no counts, ``samples_per_epoch`` required): each reader reads
  every k-th shard of endless passes seeded by (seed, e), so samples can repeat within an epoch; a
  same-size resume is exact, another size starts the next epoch with a warning. So does a
  checkpoint written before reader positions were stored, or with another ``batch_size`` or
  number of samples per epoch.
Random augmentations drawn inside workers are not replayed.

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
from datamodules.epochs import (
    Layout,
    Piece,
    base_ranges,
    epoch_layouts,
    sequence_slices,
    shard_pass,
    shares,
)
from datamodules.transforms import collate

log = logging.getLogger("duoflow.data")


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_ranks(value: list[int]) -> list[list[int]]:
    """``value`` of every rank, in rank order (all ranks must call it); [value] without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, value)
        return out
    return [value]


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
        for p in itertools.count():
            yield from ({"url": url} for url in shard_pass(self.urls, self.seed, p))


def _take_every(src: Iterable, rank: int, world_size: int) -> Iterator:
    return itertools.islice(src, rank, None, world_size)


def split_by_rank(rank: int, world_size: int):
    """Stage keeping items rank, rank + world_size, ... (shards for training, samples for validation)."""
    return functools.partial(_take_every, rank=rank, world_size=world_size)


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




class _Positions:
    """Counts the samples pulled from a reader's order and stamps each transformed sample with that count.

    Decode and transform sit between the two stages and pull one sample at a time, so a sample
    reaching ``stamp`` is the last one ``count`` let through: its stamp is the position after it
    (bad samples skipped before it included)."""

    def __init__(self, start: int):
        self.pulled = start

    def count(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            self.pulled += 1
            yield sample

    def stamp(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            sample[ORDER_KEY] = self.pulled
            yield sample


class TrainStream:
    """One rank's training batches, epoch by epoch: a pure function of (seed, epoch, layout, reader).

    ``counts``: samples per shard (None for remote shards: then each reader reads every k-th shard
    of endless shard passes, nothing is dealt on another world size). ``samples``: per epoch.
    """

    def __init__(self, urls: list[str], counts: dict[str, int] | None, samples: int, rank: int, world_size: int,
                 transform, batch_size: int, shuffle_buffer: int, seed: int, max_bad_fraction: float,
                 batch_budget: int | None = None):
        self.urls, self.counts, self.samples = list(urls), counts, samples
        self.rank, self.world_size = rank, world_size
        self.batch_budget = batch_budget
        self.transform, self.batch_size, self.shuffle_buffer, self.seed = transform, batch_size, shuffle_buffer, seed
        self.skips = SkipCounter(max_bad_fraction, rank=rank)  # one per worker (each holds a copy)

    @property
    def epoch_shape(self) -> dict[str, int]:
        """What a saved stream position depends on besides the ranks and workers (saved with it, checked on resume)."""
        return {"batch_size": self.batch_size, "epoch_samples": self.samples}

    def layouts(self, epoch: int, history: list[dict], workers: int) -> tuple[Layout, Layout, int]:
        """(base layout, this rank's current layout, samples dropped) of ``epoch`` after the resumes in ``history``."""
        return epoch_layouts(history, self.world_size, workers, self.batch_size, self.samples)

    def batches(self, epoch: int, history: list[dict], workers: int, worker: int, start: int = 0) -> Iterator[dict]:
        """Batches of this rank's ``worker`` in ``epoch``, from position ``start`` of its order (skipped undecoded).

        Each batch holds ``ORDER_KEY``: the positions after its samples. Past its pieces (bad
        samples, shards shorter than counted, budget batches) a reader goes on in a spill stream."""
        base, layout, _ = self.layouts(epoch, history, workers)
        k = self.rank * workers + worker
        spill = self.spill(epoch, len(history), k, len(layout.readers))
        raw = itertools.islice(itertools.chain(self.pieces(epoch, base, layout.readers[k]), spill), start, None)
        positions = _Positions(start)
        out: Iterable = raw
        for stage in (positions.count, self.skips.map(decode_sample), self.skips.map(self.transform),
                      self.skips.passed, positions.stamp, self.batcher()):
            out = stage(out)
        return iter(out)

    def batcher(self):
        if self.batch_budget is None:
            return wds.batched(self.batch_size, collation_fn=collate, partial=False)
        return functools.partial(budget_batched, batch_size=self.batch_size, budget=self.batch_budget,
                                 cost=self.transform.cost)

    def pieces(self, epoch: int, base: Layout, pieces: tuple[Piece, ...]) -> Iterator[dict]:
        """Raw samples of ``pieces`` (runs of base readers' orders), reading on where the last piece stopped."""
        opened: dict[int, tuple[Iterator[dict], int]] = {}
        for piece in pieces:
            order, pos = opened.get(piece.reader, (None, 0))
            if order is None or pos > piece.start:
                order, pos = self.base_order(epoch, base, piece.reader), 0
            collections.deque(itertools.islice(order, piece.start - pos), maxlen=0)  # read, not decoded
            yield from itertools.islice(order, len(piece))
            opened[piece.reader] = (order, piece.stop)

    def base_order(self, epoch: int, base: Layout, reader: int) -> Iterator[dict]:
        """Base reader ``reader``'s range of the epoch's window through its seeded shuffle buffer (raw samples)."""
        if self.counts is None:
            return iter(())
        offset, length = base_ranges(base)[reader]
        first = epoch * self.samples + offset
        rng = random.Random(f"{self.seed}:{epoch}:{base.world_size}x{base.workers}:{reader}")
        raw = self.slice_samples(sequence_slices(self.counts, self.seed, first, first + length))
        return iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw))

    def slice_samples(self, slices: list[tuple[str, int, int]]) -> Iterator[dict]:
        """Raw samples ``[a, b)`` of each shard (the members before ``a`` are read past, not decoded)."""
        expand = wds.tarfile_to_samples(handler=self.skips.bad_shard)
        for url, a, b in slices:
            samples = expand(iter([{"url": url}]))
            yield from itertools.islice(samples, a, b)
            samples.close()

    def spill(self, epoch: int, level: int, reader: int, readers: int) -> Iterator[dict]:
        """Endless raw samples after a reader's pieces: every ``readers``-th shard of endless passes, shuffled."""
        seed = f"{self.seed}:{epoch}:{level}"
        shards = _take_every(EndlessShardList(self.urls, seed=seed), reader, readers)
        raw = wds.tarfile_to_samples(handler=self.skips.bad_shard)(iter(shards))
        rng = random.Random(f"{seed}:{reader}:spill")
        return iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw))


ORDER_KEY = "__order__"
"""Sample and batch field inside a worker: the reader's position after the sample."""

POSITION_KEY = "__pos__"
"""Batch field added by EpochBatches: LongTensor [epoch, worker, batches of this worker this epoch,
positions of its order used]."""


class EpochBatches(IterableDataset):
    """This rank's batches, one epoch per ``__iter__``, split over the dataloader workers (``shares``).

    Each batch carries its position (``POSITION_KEY``), so the main process knows exactly what the
    training loop took, even though workers prefetch. ``start`` resumes mid-epoch:
    ``{"epoch": e, "history": [...], "done": [batches per worker], "samples": [positions per worker]}``;
    the used positions are skipped undecoded.
    """

    def __init__(self, stream: TrainStream, batches: int, start: dict | None = None):
        super().__init__()
        self.stream, self.batches, self.start = stream, batches, start
        self._epoch: int | None = None  # epoch of the last __iter__ in this process (worker)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        return self.worker_batches(*_worker())

    def worker_batches(self, worker: int, workers: int) -> Iterator[dict]:
        """The next epoch of worker ``worker`` of ``workers`` (the first one: where ``start`` left off)."""
        epoch, history, done, pos = (self._epoch or 0) + 1, [], 0, 0
        if self._epoch is None:
            start = self.start or {}
            epoch, history = int(start.get("epoch", 0)), list(start.get("history", []))
            if worker < len(start.get("done", [])):
                done, pos = start["done"][worker], start["samples"][worker]
        self._epoch = epoch
        _, layout, _ = self.stream.layouts(epoch, history, workers)
        batches = self.stream.batches(epoch, history, workers, worker, pos)
        for i in range(done, shares(layout.batches, workers)[worker]):
            batch = self._next(batches)
            used = int(batch.pop(ORDER_KEY).max())
            batch[POSITION_KEY] = torch.tensor([epoch, worker, i + 1, used])
            yield batch

    @staticmethod
    def _next(stream: Iterator) -> dict:
        try:
            return next(stream)
        except StopIteration:
            raise RuntimeError("the endless training pipeline stopped; are all shards empty?") from None
