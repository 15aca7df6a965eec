"""Which samples each (rank, worker) reads in an epoch, and how the rest of an epoch is dealt to another world size.

Pure arithmetic on shard sample counts: nothing here reads a file.

The sample sequence. Pass p over the data set is the shard list permuted with seed (seed, p),
each shard's samples in file order; the passes are concatenated into one endless sequence, and
epoch e is its window ``[e * S, e * S + M)``: ``S`` samples per epoch (``samples_per_epoch``, by
default the data set's size, so epoch e is pass e) cut to ``M = batches * world_size * batch_size``
(at most ``world_size * batch_size - 1`` samples of the window's tail are not used).

Readers. Reader k = rank * workers + worker. In the epoch's first layout (the *base* layout),
reader k reads a contiguous range of the window, ``share * batch_size`` samples (``share``: the
batches its dataloader worker delivers, ``shares``), ranks and workers in that order; its *order*
is that range through a shuffle buffer seeded by (seed, epoch, layout, k). Every later layout
(after a resume on another world size or worker count) gives each reader ``Piece``s: runs of base
readers' orders, so any layout is described by base orders alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Positions ``[start, stop)`` of base reader ``reader``'s order."""

    reader: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """Who reads what in (the rest of) one epoch: ``readers[rank * workers + worker]`` is that reader's pieces."""

    world_size: int
    workers: int
    batches: int  # per rank
    readers: tuple[tuple[Piece, ...], ...]


def shares(batches: int, workers: int) -> list[int]:
    """Batches each dataloader worker delivers: the loader takes them round-robin, worker 0 first."""
    return [batches // workers + (w < batches % workers) for w in range(workers)]


def shard_pass(urls: list[str], seed: int | str, p: int) -> list[str]:
    """Pass p's shard order: the same on every rank and worker."""
    order = list(urls)
    random.Random(f"{seed}:{p}").shuffle(order)
    return order


def sequence_slices(counts: dict[str, int], seed: int | str, start: int, stop: int) -> list[tuple[str, int, int]]:
    """Positions ``[start, stop)`` of the endless pass sequence as (shard, first sample, end sample) slices."""
    total = sum(counts.values())
    out: list[tuple[str, int, int]] = []
    pos = start
    while pos < stop:
        p, offset = divmod(pos, total)
        begin = 0  # the current shard's first position in pass p
        for url in shard_pass(list(counts), seed, p):
            end = begin + counts[url]
            if end > offset and begin < offset + (stop - pos):
                a, b = max(offset, begin) - begin, min(end, offset + stop - pos) - begin
                out.append((url, a, b))
            begin = end
        pos = (p + 1) * total
    return out


def base_layout(world_size: int, workers: int, batch_size: int, samples: int) -> Layout:
    """The epoch's first layout: ``samples // (world_size * batch_size)`` batches per rank, one range per reader."""
    batches = samples // (world_size * batch_size)
    sizes = shares(batches, workers) * world_size
    return Layout(world_size, workers, batches, tuple((Piece(k, 0, n * batch_size),) for k, n in enumerate(sizes)))


def base_ranges(layout: Layout) -> list[tuple[int, int]]:
    """Each base reader's window positions ``(offset, length)``, readers in order."""
    out, offset = [], 0
    for (piece,) in layout.readers:
        out.append((offset, len(piece)))
        offset += len(piece)
    return out


def split(pieces: tuple[Piece, ...], n: int) -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    """(the first n positions, the rest) of a run of pieces."""
    head: list[Piece] = []
    rest = list(pieces)
    while rest and n > 0:
        first = rest.pop(0)
        if len(first) <= n:
            head.append(first)
            n -= len(first)
        else:
            head.append(Piece(first.reader, first.start, first.start + n))
            rest.insert(0, Piece(first.reader, first.start + n, first.stop))
            n = 0
    return tuple(head), tuple(rest)


def deal(layout: Layout, consumed: list[int], world_size: int, workers: int, batch_size: int) -> tuple[Layout, int]:
    """(the layout of the rest of the epoch on ``world_size`` x ``workers``, samples dropped).

    ``consumed[k]``: positions of reader k's order used so far (delivered or skipped as bad). The
    readers' remainders, in reader order, are cut into equal whole batches per rank (rank after
    rank, each rank's part cut into its workers' shares); the tail that cannot fill
    ``world_size * batch_size`` more samples is dropped."""
    if len(consumed) != len(layout.readers):
        raise ValueError(f"deal: {len(consumed)} reader positions for a layout of {len(layout.readers)} readers")
    rest = tuple(p for pieces, n in zip(layout.readers, consumed) for p in split(pieces, n)[1])
    total = sum(map(len, rest))
    batches = total // (world_size * batch_size)
    readers = []
    for n in shares(batches, workers) * world_size:
        piece, rest = split(rest, n * batch_size)
        readers.append(piece)
    return Layout(world_size, workers, batches, tuple(readers)), total - batches * world_size * batch_size


def epoch_layouts(history: list[dict], world_size: int, workers: int, batch_size: int,
                  samples: int) -> tuple[Layout, Layout, int]:
    """(base layout, current layout, samples the last deal dropped) of an epoch resumed ``len(history)`` times
    on other sizes; ``history[i]``: ``{"world_size", "workers", "samples": [position per reader]}`` of layout i."""
    sizes = [(h["world_size"], h["workers"]) for h in history] + [(world_size, workers)]
    base = layout = base_layout(*sizes[0], batch_size, samples)
    dropped = 0
    for h, (r, w) in zip(history, sizes[1:]):
        layout, dropped = deal(layout, list(h["samples"]), r, w, batch_size)
    return base, layout, dropped
