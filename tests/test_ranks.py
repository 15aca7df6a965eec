"""A rank that dies mid-step: the survivor names it in one line and exits non-zero within a bound,
and nothing the run started is left running (callbacks/ranks.py, `duoflow fit` over gloo on CPU)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from tests.conftest import ROOT, SMALL, TINY

BOUND = 30.0  # seconds from the SIGKILL until every process of the run is gone


class Pids(L.Callback):
    """Prints `test: rank R pid P step S` each step (what the test kills), a little slowed down."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        time.sleep(0.05)
        print(f"test: rank {trainer.global_rank} pid {os.getpid()} step {trainer.global_step}", flush=True)


def session_pids(sids: set[int]) -> list[int]:
    """Live processes (zombies excluded) of the given sessions: everything the runs started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sids:  # state, ..., session id
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_diagnosis_names_silent_ranks_only() -> None:
    """In-process, on a real TCPStore: a rank that stopped beating is named, unless it reported the failure
    itself (a survivor that already left); an unreachable store means rank 0, which serves it, is gone."""
    import torch.distributed as dist

    from callbacks.ranks import NOTE, RankWatch, is_collective_failure, vanished_line

    server = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    watches = [RankWatch(interval=0.05, stale_after=0.5) for _ in range(3)]
    for rank in (0, 1, 2):  # rank 3 of 4 never beats
        watches[rank].start(dist.TCPStore("127.0.0.1", server.port, is_master=False), rank, 4)
    watches[2].stop()  # rank 2 stops beating ...
    assert watches[0].vanished() == [2, 3]
    server.set(RankWatch.key(2, "failed"), "1")  # ... having reported the failure: it was a survivor
    assert watches[1].vanished() == [3]

    lonely = RankWatch(interval=0.05, stale_after=0.5)
    lonely.start(dist.TCPStore("127.0.0.1", server.port, is_master=False), 1, 2)
    del server  # the store's server goes with rank 0
    assert lonely.vanished() == [0]
    for watch in (*watches, lonely):
        watch.stop()

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer")
    assert is_collective_failure(gloo) and not is_collective_failure(ValueError("bad config"))
    gloo.__notes__ = [NOTE + "rank 1 of 2 vanished"]
    assert vanished_line(gloo) == "rank 1 of 2 vanished" and vanished_line(ValueError()) is None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim, how, timeout", [  # ~50 s each on 2 busy cores
    (1, signal.SIGKILL, "0:00:20"),
    pytest.param(0, signal.SIGKILL, "0:00:20", marks=pytest.mark.slow),  # rank 0 serves the rendezvous store
    pytest.param(1, signal.SIGSTOP, "0:00:10", marks=pytest.mark.slow),  # silent, not dead: the timeout ends it
], ids=["kill-rank1", "kill-rank0", "stop-rank1"])
def test_survivor_names_the_vanished_rank_and_exits(tmp_path: Path, image_shards: Path, victim: int,
                                                    how: signal.Signals, timeout: str) -> None:
    """Each rank started apart with torchrun's variables, as srun or torchrun start them. (Under Lightning's
    own launcher, `fit --trainer.devices 2`, its process observer SIGKILLs the main process instead.)"""
    cmd = [sys.executable, "-m", "app", "fit", "--config", TINY, "--config", str(ROOT / "configs/trainer/ddp.yaml"),
           *SMALL, "--data.train_shards", str(image_shards / "*.tar"), "--runs_dir", str(tmp_path / "runs"),
           "--name", "r", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "100000",
           "--trainer.logger", "false", "--trainer.strategy.init_args.timeout", timeout,
           "--trainer.callbacks+=tests.test_ranks.Pids"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", NODE_RANK="0")
    launches = [{"LOCAL_RANK": str(r)} for r in (0, 1)]
    logs = [tmp_path / f"launch{i}.log" for i in range(len(launches))]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env | extra, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True) for extra, log in zip(launches, logs)]
    sids = {p.pid for p in procs}
    try:
        def pids() -> dict[int, int]:  # rank -> pid, once both ranks have taken 3 steps
            text = "".join(log.read_text() for log in logs)
            seen = {int(r): int(p) for r, p, s in re.findall(r"test: rank (\d) pid (\d+) step (\d+)", text) if int(s) >= 3}
            return seen if len(seen) == 2 else {}

        end = time.monotonic() + 120
        while not (ranks := pids()):
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                pytest.fail("the 2-rank run did not start training:\n" + "".join(log.read_text()[-3000:] for log in logs))
            time.sleep(0.2)

        os.kill(ranks[victim], how)
        killed = time.monotonic()
        survivor = 1 - victim
        if how == signal.SIGSTOP:  # the stopped rank stays; the survivor must not wait for it past the timeout
            sids = {procs[survivor].pid}
        while session_pids(sids) and time.monotonic() - killed < BOUND:
            time.sleep(0.1)
        took = time.monotonic() - killed
        left = session_pids(sids)
        assert not left, f"still running {BOUND:.0f} s after the {how.name}: {left}"
        print(f"\n{how.name} to rank {victim} -> every process of rank {survivor} gone in {took:.1f} s")

        out = logs[survivor].read_text()
        assert procs[survivor].wait(timeout=5) == 4, out[-3000:]
        lines = [line for line in out.splitlines() if "vanished" in line or line.startswith("error")]
        assert len(lines) == 1 and f"rank {victim} of 2 vanished" in lines[0], out[-3000:]
        assert f"rank {survivor} stopped at step" in lines[0]
        assert "Traceback" not in out and "frame #" not in out, out[-3000:]  # no stack dumps, Python's or C++'s
    finally:
        for pid in session_pids({p.pid for p in procs}):
            os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=10)
