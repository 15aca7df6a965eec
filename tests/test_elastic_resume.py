"""A run checkpointed on R ranks x W dataloader workers resumes on R' x W' and finishes the same epoch:
every sample of the epoch once (before + after the resume), in an order fixed by (R', W').

Ranks are faked in-process (``dist_info`` patched) and workers driven in the DataLoader's round-robin
order, so the tests need no process group; one test uses real worker processes."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import shards
from datamodules.epochs import Piece, base_layout, deal, sequence_slices
from datamodules.shards import ShardDataModule
from datamodules.transforms import ImageTransform
from tests.test_data import png_bytes, write_raw_tar

UNEVEN = [20, 5, 13, 10]  # 48 samples: whole batches of 4 on 1, 2 or 3 ranks


def write_shards(folder: Path, sizes: list[int], mixed: bool = False) -> list[str]:
    """Shards of the given sizes, keys "s<shard>-<index>"; ``mixed``: images of three aspect ratios."""
    folder.mkdir(exist_ok=True)
    paths = []
    for s, size in enumerate(sizes):
        members = []
        for i in range(size):
            width = 16 * (1 + (i % 3 if mixed else 0))
            members.append((f"s{s}-{i:03d}.png", png_bytes(np.full((16, width, 3), 10 * s + i, np.uint8))))
        paths.append(write_raw_tar(folder / f"shard-{s}.tar", members))
    return paths


class Rank:
    """One fake rank: its ShardDataModule and its dataloader workers, taken in the loader's round-robin order."""

    def __init__(self, monkeypatch, data: list[str], rank: int, ranks: int, workers: int, state: dict | None = None,
                 **options):
        monkeypatch.setattr(shards, "dist_info", lambda: (rank, ranks))
        options.setdefault("transform", ImageTransform(size=16))
        self.module = ShardDataModule(data, num_workers=workers, shuffle_buffer=6, **options)
        if state:
            self.module.load_state_dict(state)
        dataset = self.module.train_dataloader().dataset
        count = max(1, workers)
        self.workers: list[Iterator | None] = [copy.deepcopy(dataset).worker_batches(w, count) for w in range(count)]
        self.turn, self.keys = 0, []

    def step(self) -> bool:
        """Take the next batch of the epoch (False when the epoch is over)."""
        while any(self.workers):
            w = self.turn % len(self.workers)
            self.turn += 1
            batch = next(self.workers[w], None) if self.workers[w] else None
            if batch is None:
                self.workers[w] = None
                continue
            self.module.on_before_batch_transfer(batch, 0)
            self.keys.append(list(batch["__key__"]))
            return True
        return False


def start(monkeypatch, data, ranks: int, workers: int, state: dict | None = None, **options) -> list[Rank]:
    return [Rank(monkeypatch, data, r, ranks, workers, state, **options) for r in range(ranks)]


def run(group: list[Rank], steps: int | None = None) -> None:
    """All ranks in lockstep, ``steps`` steps or to the end of the epoch; every rank takes as many batches."""
    for _ in itertools.count() if steps is None else range(steps):
        taken = [rank.step() for rank in group]
        assert len(set(taken)) == 1, "ranks took different batch counts"
        if not taken[0]:
            return


def checkpoint(group: list[Rank], monkeypatch) -> dict:
    """What rank 0 saves: its state with every rank's reader positions (the all-gather of a real run)."""
    monkeypatch.setattr(shards, "dist_info", lambda: (0, len(group)))
    states = [rank.module.state_dict() for rank in group]
    return {**states[0], "samples": [n for state in states for n in state["samples"]]}


def keys(group: list[Rank]) -> list[str]:
    return [k for rank in group for batch in rank.keys for k in batch]


def all_keys(sizes: list[int]) -> list[str]:
    return sorted(f"s{s}-{i:03d}" for s, size in enumerate(sizes) for i in range(size))


# ---------------------------------------------------------------- the layout arithmetic


def test_sequence_slices_walk_whole_passes_of_the_shards() -> None:
    counts = {"a": 3, "b": 5, "c": 2}

    def samples(start: int, stop: int) -> list[tuple[str, int]]:
        return [(url, i) for url, a, b in sequence_slices(counts, seed=0, start=start, stop=stop) for i in range(a, b)]

    assert sorted(samples(0, 10)) == sorted((url, i) for url, n in counts.items() for i in range(n))  # each once
    assert samples(0, 14) == samples(0, 10) + samples(10, 14) and samples(7, 14) == samples(0, 14)[7:]
    assert samples(10, 20) != samples(0, 10)  # pass 1 is another shard order


def test_deal_gives_ranks_equal_whole_batches_and_drops_only_a_short_tail() -> None:
    layout = base_layout(world_size=1, workers=2, batch_size=4, samples=50)  # 12 batches: 6 + 6
    assert [[(p.reader, p.start, p.stop) for p in r] for r in layout.readers] == [[(0, 0, 24)], [(1, 0, 24)]]
    dealt, dropped = deal(layout, [9, 4], world_size=3, workers=1, batch_size=4)  # 15 + 20 left
    assert dealt.batches == 2 and dropped == 35 - 24
    assert dealt.readers[0] == (Piece(0, 9, 17),) and dealt.readers[1] == (Piece(0, 17, 24), Piece(1, 4, 5))
    assert sum(len(p) for r in dealt.readers for p in r) == 24


# ---------------------------------------------------------------- every sample once


@pytest.mark.parametrize("sizes", [UNEVEN, [30, 18]])  # uneven; fewer shards than the 4 readers
def test_an_epoch_reads_every_sample_once_over_ranks_and_workers(tmp_path: Path, monkeypatch, sizes) -> None:
    data = write_shards(tmp_path / "data", sizes)
    group = start(monkeypatch, data, ranks=2, workers=2, batch_size=4)
    run(group)
    assert sorted(keys(group)) == all_keys(sizes)
    assert all(len(rank.keys) == 6 for rank in group)


RESIZES = [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 1), (1, 2)), ((1, 2), (1, 1)), ((2, 2), (3, 1))]


@pytest.mark.parametrize(("before", "after"), RESIZES, ids=lambda s: "x".join(map(str, s)))
def test_resume_on_another_size_finishes_the_epoch_with_every_sample_once(tmp_path: Path, monkeypatch, before,
                                                                         after) -> None:
    data = write_shards(tmp_path / "data", UNEVEN)
    first = start(monkeypatch, data, *before, batch_size=4)
    run(first, steps=3)
    state = checkpoint(first, monkeypatch)

    resumed = start(monkeypatch, data, *after, state=state, batch_size=4)
    run(resumed)
    seen = keys(first) + keys(resumed)
    left = len(all_keys(UNEVEN)) - 3 * 4 * before[0]
    assert len(seen) == len(set(seen)) and set(seen) <= set(all_keys(UNEVEN))  # no repeat
    assert len(all_keys(UNEVEN)) - len(seen) == left % (4 * after[0])  # only what fills no batch on every rank
    assert len({len(r.keys) for r in resumed}) == 1  # equal batch counts per rank
    again = start(monkeypatch, data, *after, state=state, batch_size=4)
    run(again)
    assert [r.keys for r in again] == [r.keys for r in resumed]  # the order after the resume is fixed by (R', W')

    nxt = start(monkeypatch, data, *after, state=checkpoint(resumed, monkeypatch), batch_size=4)
    run(nxt, steps=2)  # the next epoch starts fresh in the new layout
    assert len(set(keys(nxt))) == 2 * 4 * after[0]


def test_resume_drops_at_most_what_fills_no_batch_on_every_rank(tmp_path: Path, monkeypatch, caplog) -> None:
    sizes = [20, 5, 15, 10]  # 50 samples: 1 rank x 4 uses 48 of them
    data = write_shards(tmp_path / "data", sizes)
    whole = start(monkeypatch, data, 1, 1, batch_size=4)
    run(whole)
    epoch = set(keys(whole))
    first = start(monkeypatch, data, 1, 1, batch_size=4)
    run(first, steps=1)  # 44 left: 5 batches on each of 2 ranks, 4 samples dropped
    resumed = start(monkeypatch, data, 2, 1, state=checkpoint(first, monkeypatch), batch_size=4)
    run(resumed)
    seen = keys(first) + keys(resumed)
    assert len(seen) == len(set(seen)) == 44 and set(seen) <= epoch
    assert "4 samples that fill no batch" in caplog.text


def test_a_second_resume_on_yet_another_size_still_reads_each_sample_once(tmp_path: Path, monkeypatch) -> None:
    data = write_shards(tmp_path / "data", UNEVEN)
    first = start(monkeypatch, data, 2, 1, batch_size=4)
    run(first, steps=2)
    second = start(monkeypatch, data, 1, 2, state=checkpoint(first, monkeypatch), batch_size=4)
    run(second, steps=2)  # 24 left: 2 batches on each of 3 ranks
    third = start(monkeypatch, data, 3, 1, state=checkpoint(second, monkeypatch), batch_size=4)
    run(third)
    assert sorted(keys(first) + keys(second) + keys(third)) == all_keys(UNEVEN)


def test_same_size_resume_continues_each_worker_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    data = write_shards(tmp_path / "data", UNEVEN)
    whole = start(monkeypatch, data, 2, 2, batch_size=4)
    run(whole)
    first = start(monkeypatch, data, 2, 2, batch_size=4)
    run(first, steps=3)
    resumed = start(monkeypatch, data, 2, 2, state=checkpoint(first, monkeypatch), batch_size=4)
    run(resumed)
    for a, b, c in zip(whole, first, resumed):
        assert b.keys == a.keys[:3]
        # the same batches; the round-robin restarts at worker 0 (worker 1's next batch comes first before)
        assert sorted(c.keys) == sorted(a.keys[3:])


def test_token_budget_batches_never_repeat_a_sample_across_a_resize(tmp_path: Path, monkeypatch) -> None:
    """With batch_budget a batch may hold fewer than batch_size samples, so an epoch can end before its
    last samples: what holds is no repeat, equal batch counts per rank, only the epoch's samples."""
    data = write_shards(tmp_path / "data", UNEVEN, mixed=True)
    options = {"batch_size": 4, "batch_budget": 150, "transform": ImageTransform(size=16, keep_aspect=True, multiple=2)}
    first = start(monkeypatch, data, 2, 1, **options)
    run(first, steps=2)
    assert any(len(b) < 4 for r in first for b in r.keys)  # the budget really closes batches early
    resumed = start(monkeypatch, data, 1, 2, state=checkpoint(first, monkeypatch), **options)
    run(resumed)
    seen = keys(first) + keys(resumed)
    assert len(seen) == len(set(seen)) and set(seen) <= set(all_keys(UNEVEN))


def test_real_worker_processes_two_then_one(tmp_path: Path) -> None:
    """A DataLoader with 2 worker processes (prefetching) stopped mid-epoch, resumed with 1 worker."""
    data = write_shards(tmp_path / "data", UNEVEN)
    before = ShardDataModule(data, batch_size=4, num_workers=2, shuffle_buffer=6, transform=ImageTransform(size=16))
    seen = []
    for batch in itertools.islice(before.train_dataloader(), 5):
        seen += before.on_before_batch_transfer(batch, 0)["__key__"]
    after = ShardDataModule(data, batch_size=4, num_workers=1, shuffle_buffer=6, transform=ImageTransform(size=16))
    after.load_state_dict(before.state_dict())
    loader = after.train_dataloader()
    for batch in loader:
        seen += after.on_before_batch_transfer(batch, 0)["__key__"]
    assert sorted(seen) == all_keys(UNEVEN)


def test_remote_shards_resume_exactly_on_the_same_size_and_move_on_otherwise(tmp_path: Path, monkeypatch,
                                                                           caplog) -> None:
    """Remote shards have no sample counts: readers take every k-th shard (no exact-once), a same-size
    resume still continues exactly, another size starts the next epoch."""
    data = [f"pipe:cat {path}" for path in write_shards(tmp_path / "data", UNEVEN)]
    whole = start(monkeypatch, data, 1, 1, batch_size=4, samples_per_epoch=48)
    run(whole)
    first = start(monkeypatch, data, 1, 1, batch_size=4, samples_per_epoch=48)
    run(first, steps=5)
    state = checkpoint(first, monkeypatch)
    resumed = start(monkeypatch, data, 1, 1, state=state, batch_size=4, samples_per_epoch=48)
    run(resumed)
    assert first[0].keys + resumed[0].keys == whole[0].keys
    other = start(monkeypatch, data, 2, 1, state=state, batch_size=4, samples_per_epoch=48)
    assert "starting epoch 1" in caplog.text
    run(other, steps=1)
    assert [rank.module.state_dict()["epoch"] for rank in other] == [1, 1]


def test_lightning_fit_with_two_workers_resumed_with_one(tmp_path: Path) -> None:
    """Through Lightning's loop (prefetching workers, the checkpoint it writes): stopped after 5 of the 12
    steps of an epoch, resumed from that checkpoint with 1 worker instead of 2."""
    import lightning

    from tests.test_data_lightning import TinyModule

    data = write_shards(tmp_path / "data", UNEVEN)

    def fit(steps: int, workers: int, module: TinyModule, ckpt: Path | None = None) -> lightning.Trainer:
        trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        datamodule = ShardDataModule(data, batch_size=4, num_workers=workers, shuffle_buffer=6,
                                     transform=ImageTransform(size=16))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        return trainer

    before, after = TinyModule(), TinyModule()
    fit(5, 2, before).save_checkpoint(tmp_path / "stop.ckpt")
    fit(12, 1, after, tmp_path / "stop.ckpt")
    assert len(before.train_keys) == 20 and sorted(before.train_keys + after.train_keys) == all_keys(UNEVEN)


def test_a_changed_batch_size_starts_the_next_epoch(tmp_path: Path, monkeypatch, caplog) -> None:
    """Reader positions count samples of orders that depend on the batch size: they are not reused."""
    data = write_shards(tmp_path / "data", UNEVEN)
    first = start(monkeypatch, data, 1, 1, batch_size=4)
    run(first, steps=3)
    resumed = start(monkeypatch, data, 1, 1, state=checkpoint(first, monkeypatch), batch_size=6)
    run(resumed, steps=1)
    assert "batch_size 4" in caplog.text and resumed[0].module.state_dict()["epoch"] == 1


def _gather_worker(rank: int, folder: str, port: int) -> None:
    """One gloo rank: takes 1 + rank batches of worker 0, then writes what state_dict holds."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    module = ShardDataModule(folder, batch_size=4, num_workers=0, shuffle_buffer=6, transform=ImageTransform(size=16))
    module.train_dataloader()
    module.on_before_batch_transfer({"__pos__": torch.tensor([0, 0, 2, 7 + rank])}, 0)  # rank 1 skipped a bad one
    state = module.state_dict()
    if rank == 0:
        Path(folder, "state.json").write_text(json.dumps(state))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes import torch and Lightning: 77 s on the loaded 2-core machine
def test_checkpoint_gathers_every_ranks_positions(tmp_path: Path) -> None:
    """Lightning saves rank 0's state only, so state_dict gathers the reader positions of all ranks."""
    import json
    import socket

    import torch.multiprocessing as mp

    write_shards(tmp_path, UNEVEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(str(tmp_path), port), nprocs=2)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["world_size"] == 2 and state["done"] == [2] and state["samples"] == [7, 8]
