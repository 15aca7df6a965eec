"""Say which rank vanished when a collective fails, and bound how long the survivors take to exit.

When a rank dies mid-step (SIGKILL, the OOM killer, a lost node) the others learn it inside a
collective: gloo at once when the dead peer's TCP connection closes ("Connection closed by peer"),
otherwise after the process group's timeout, `DDPStrategy(timeout=...)` (configs/trainer/ddp.yaml).
Neither error names the rank that is gone. This callback does: every rank's heartbeat thread bumps
its counter in the rendezvous store (the TCPStore served by rank 0, which every backend has) each
`interval` seconds; after a failed step a survivor reads the counters twice, `stale_after` apart,
and the ranks whose counters stood still are the vanished ones (an unreachable store: rank 0, which
serves it, vanished). The diagnosis is logged as one line at once and attached to the exception as
a note; `duoflow fit` then exits with RANK_VANISHED_EXIT (no traceback), on which slurm/train.sbatch
requeues. If shutting down after the failure hangs (a blocked NCCL kernel, a data-loader worker, a
logger), the process ends itself `exit_after` seconds after the diagnosis, with the same code; after
a clean teardown it ends once the exit handlers (W&B's) have run, skipping the destructors of the broken
process group (they take seconds).

Ranks started by srun or torchrun each run this. Under Lightning's own launcher (`fit --trainer.devices N`
on one machine) its process observer SIGKILLs the main process within 5 s of a child rank's death
(exit 137, the line printed only if the diagnosis was quicker).

`duoflow fit` adds this callback to every multi-process run; list it in a config to change its timings.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from datetime import timedelta

import lightning as L
import torch.distributed as dist

log = logging.getLogger("duoflow.ranks")

RANK_VANISHED_EXIT = 4  # exit code of a survivor (slurm/train.sbatch requeues the job on it)
NOTE = "duoflow: "  # prefix of the note this callback attaches to the exception


def vanished_line(exception: BaseException) -> str | None:
    """The one-line diagnosis RankWatch attached to `exception`, None if it attached none."""
    for note in getattr(exception, "__notes__", ()):
        if note.startswith(NOTE):
            return note[len(NOTE):]
    return None


def is_collective_failure(exception: BaseException) -> bool:
    """An error of the process group itself (a broken connection, a collective timeout), by type or by
    the backend's message (gloo raises plain RuntimeErrors)."""
    text = str(exception)
    return isinstance(exception, dist.DistError) or (
        isinstance(exception, RuntimeError) and any(k in text for k in ("gloo", "Gloo", "NCCL", "c10d")))


class RankWatch(L.Callback):
    def __init__(self, interval: float = 1.0, stale_after: float = 3.0, exit_after: float = 30.0):
        """
        Args:
            interval: Seconds between two heartbeats of a rank.
            stale_after: A rank whose heartbeat did not move for this long has vanished (> interval).
            exit_after: After a failed collective, end the process this many seconds after the
                diagnosis if it has not exited by then (shutdown can block on a dead peer).
        """
        if stale_after <= interval:
            raise ValueError(f"RankWatch: stale_after ({stale_after}) must exceed interval ({interval})")
        self.interval, self.stale_after, self.exit_after = interval, stale_after, exit_after
        self.rank, self.world_size = 0, 1
        self._store: dist.Store | None = None
        self._stop: threading.Event | None = None  # made by start() (keeps the callback picklable)
        self.failed = False  # set by the diagnosis: end the process when Python's exit handlers are done
        # registered now, before a logger's (wandb.init registers its own later): exit handlers run last
        # registered first, so this one ends the process after W&B has closed its run, but before the
        # destructors of the broken process group run (they take seconds)
        atexit.register(self._exit_if_failed)

    @staticmethod
    def key(rank: int, what: str = "heartbeat") -> str:
        return f"duoflow/{what}/{rank}"

    # ---- heartbeats, from setup to teardown ---------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size < 2 or self._store is not None:
            return
        env = trainer.strategy.cluster_environment  # the process group is up: its rendezvous is known
        # a client of its own (the process group's is busy in collectives); ops fail after stale_after
        store = dist.TCPStore(env.main_address, env.main_port, is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=max(self.stale_after, 1.0)))
        self.start(store, trainer.global_rank, trainer.world_size)

    def start(self, store: dist.Store, rank: int, world_size: int) -> None:
        """Beat for `rank` in `store` until teardown."""
        self._store, self.rank, self.world_size = store, rank, world_size
        store.add(self.key(rank), 1)
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), name="duoflow-heartbeat", daemon=True).start()

    def _beat(self, stop: threading.Event) -> None:
        store, key = self._store, self.key(self.rank)
        while store is not None and not stop.wait(self.interval):
            try:
                store.add(key, 1)
            except Exception:  # the store is gone with rank 0: the diagnosis reports it, if there is one
                return

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self._store = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop()

    # ---- the diagnosis, when fit fails ----------------------------------------------------------

    def vanished(self) -> list[int]:
        """Ranks whose heartbeat stood still for stale_after seconds and that did not report the failure
        themselves (a survivor may exit, and stop beating, before this rank has looked); [0] when the
        store is unreachable."""
        assert self._store is not None
        keys = [self.key(r) for r in range(self.world_size)]
        try:
            self._store.set(self.key(self.rank, "failed"), "1")  # alive, and saw it too
            before = [self._store.add(k, 0) for k in keys]
            time.sleep(self.stale_after)
            after = [self._store.add(k, 0) for k in keys]
            return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]
                    and not self._store.check([self.key(r, "failed")])]
        except Exception:
            return [0]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._store is None or isinstance(exception, KeyboardInterrupt):
            return
        gone = self.vanished()
        collective = is_collective_failure(exception)
        if not gone and not collective:
            return  # an ordinary error of this rank: reported as usual
        first = (str(exception).strip().splitlines() or [type(exception).__name__])[-1][:200]
        if gone:
            who = ", ".join(map(str, gone))
            line = (f"rank{'s' if len(gone) > 1 else ''} {who} of {self.world_size} vanished "
                    f"(process died or node unreachable; {'it served the rendezvous store; ' if gone == [0] else ''}"
                    f"no heartbeat for {self.stale_after:g} s); rank {self.rank} stopped at step "
                    f"{trainer.global_step}: {first}")
        else:
            line = (f"a collective failed on rank {self.rank} at step {trainer.global_step} while all "
                    f"{self.world_size} ranks still answer (one is stuck, or the network between them failed): {first}")
        log.error(line)  # now, not after the shutdown: that may block, or be cut short by a launcher
        # `duoflow fit` exits with RANK_VANISHED_EXIT on this note (add_note is Python 3.11+: the same by hand)
        exception.__notes__ = [*getattr(exception, "__notes__", []), NOTE + line]
        self.failed = True
        timer = threading.Timer(self.exit_after, exit_now)  # if Lightning's teardown blocks
        timer.daemon = True
        timer.start()

    def _exit_if_failed(self) -> None:
        if self.failed:
            exit_now()


def exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(RANK_VANISHED_EXIT)
