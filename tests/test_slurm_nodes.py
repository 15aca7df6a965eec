"""Two Slurm nodes on one machine (slurm/local-cluster.sh with LOCAL_SLURM_NODES=2: each slurmd in a network
namespace of its own): a 2-node x 1-task DDP job over gloo is preempted and resumes, and a job that loses a
rank mid-step is requeued by its batch script and resumes from the last checkpoint. Slow: minutes each."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from app.__main__ import main
from tests.conftest import ROOT, SMALL, TINY
from tests.test_slurm import check_round_trip, grep, local_cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from local_cluster(tmp_path_factory, nodes=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert main(["shards", "synthetic", "image", str(out), "--num", "128", "--size", "16", "--shard-size", "32"]) == 0
    return out


def submit(cluster: dict[str, str], run: Path, shards: Path, max_steps: int, *extra: str) -> str:
    """`slurm submit` of a 2-node x 1-task CPU job; the job id."""
    done = subprocess.run(
        [sys.executable, "-m", "app", "slurm", "submit", "--config", TINY, "--config", "configs/trainer/ddp.yaml",
         "--nodes", "2", "--tasks-per-node", "1", "--name", run.name, "--runs_dir", str(run.parent),
         "--time", "0:15:00", "--", *SMALL, "--data.train_shards", str(shards / "*.tar"),
         "--trainer.max_steps", str(max_steps), *(extra or ["--trainer.callbacks+=tests.test_slurm.SlowSteps"])],
        cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def scontrol(cluster: dict[str, str], job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=cluster, capture_output=True, text=True,
                          timeout=30).stdout


def task_pid(job: str, rank: int) -> int | None:
    """The pid of the job's training process of this rank (srun's task SLURM_PROCID=rank)."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"app\0fit" in cmd and f"SLURM_JOB_ID={job}".encode() in env
                and f"SLURM_PROCID={rank}".encode() in env and b"SLURM_STEP_ID=0" in env):
            return int(entry.name)
    return None


@pytest.mark.timeout(420)
def test_two_nodes_preempt_requeue_resume(two_nodes: dict[str, str], shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "nodes"
    job = submit(two_nodes, run, shards, max_steps=120)
    log = run / f"slurm-{job}.out"
    try:
        check_round_trip(two_nodes, job, run, log, 120)
        assert f"duoflow: job {job} (restart 0) on node[1-2]" in log.read_text()  # one task on each node
    finally:
        subprocess.run(["scancel", job], env=two_nodes, capture_output=True, timeout=30)


@pytest.mark.timeout(600)
def test_dead_rank_requeues_and_resumes(two_nodes: dict[str, str], shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "dead"
    callbacks = json.dumps([{"class_path": "callbacks.checkpoint.RunCheckpoint",
                             "init_args": {"every_n_train_steps": 30}},
                            {"class_path": "callbacks.preemption.Preemption"},
                            {"class_path": "tests.test_slurm.SlowSteps"}])
    job = submit(two_nodes, run, shards, 80, "--trainer.callbacks", callbacks)
    log = run / f"slurm-{job}.out"
    try:
        # a checkpoint every 30 steps: kill rank 1 (on node2) after the first
        wait_for("step 40", lambda: any(int(s) >= 40 for s in grep(log, r"test: step (\d+)")), 300, log)
        pid = task_pid(job, 1)
        assert pid, "rank 1's process not found"
        subprocess.run(["kill", "-9", str(pid)], check=True)
        killed = time.monotonic()
        firsts = wait_for("the requeued run's first step",
                          lambda: (f := grep(log, r"test: first step (\d+)"))[1:] and f, 180, log)
        took = time.monotonic() - killed
        text = log.read_text()
        vanished = [line for line in text.splitlines() if "vanished" in line]
        assert len(vanished) == 1 and "rank 1 of 2 vanished" in vanished[0], text[-3000:]
        assert re.search(rf"training failed \(exit (4|137)\): requeueing job {job} \(failure 1 of 3\)", text)
        assert grep(log, r"fit starts at global_step=(\d+)") == ["0", "30"]  # resumed from the last checkpoint
        assert firsts == ["1", "31"]
        print(f"\nrank 1 killed -> resumed training: {took:.1f} s")

        def finished() -> str:
            info = scontrol(two_nodes, job)
            return info if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT)", info) else ""

        info = wait_for("the job to finish", finished, 180, log)
        assert "JobState=COMPLETED" in info and "Restarts=1" in info, info
        ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 80
        wandb_id = (run / "wandb_id").read_text().strip()
        sessions = sorted((run / "wandb").glob("offline-run-*"))
        assert len(sessions) == 2 and all(p.name.endswith("-" + wandb_id) for p in sessions)  # one W&B run
    finally:
        subprocess.run(["scancel", job], env=two_nodes, capture_output=True, timeout=30)
