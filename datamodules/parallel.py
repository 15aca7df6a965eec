"""Worker processes of the folder commands: results in task order, so shards do not depend on the worker count."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def init_worker() -> None:
    import torch  # as DataLoader workers do: one thread each, and no OpenMP pool inherited across fork

    torch.set_num_threads(1)


def check_workers(workers: int) -> int:
    """``--workers``, checked before anything is written."""
    if workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {workers}")
    return workers


@contextlib.contextmanager
def ordered_map(fn: Callable[[Any], Any], tasks: list, workers: int) -> Iterator[Iterable]:
    """``fn`` over ``tasks`` in ``workers`` processes (in this one for 1), yielding results in task order.

    ``fn`` must never raise for a bad input (return the failure instead): the pool is torn down on exit.
    """
    if check_workers(workers) == 1 or len(tasks) <= 1:
        yield map(fn, tasks)
        return
    import multiprocessing

    pool = multiprocessing.Pool(min(workers, len(tasks)), initializer=init_worker)
    try:
        yield pool.imap(fn, tasks, chunksize=1)  # in task order, whatever finishes first
    finally:
        pool.terminate()
