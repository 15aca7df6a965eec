"""Slurm: the rendered batch script, the Preemption callback in-process, and a real
signal -> checkpoint -> requeue -> resume round trip on a local one-node Slurm (slurm/local-cluster.sh)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import pytest
import torch

from app.__main__ import main
from tests.conftest import ROOT, SMALL, TINY

# ---- test-only callbacks (also loaded by the Slurm job through --trainer.callbacks+=) ---------

class SignalAt(L.Callback):
    """Sends SIGUSR1 to this process during step `step`, as Slurm would; remembers the Preemption callback."""

    preemption: Any = None

    def __init__(self, step: int = 5):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        from callbacks.preemption import Preemption

        SignalAt.preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


class SlowSteps(L.Callback):
    """Makes the tiny job slow enough to be signalled mid-run, and prints its progress for the test."""

    def __init__(self, delay: float = 0.03, every: int = 10):
        self.delay, self.every, self.first = delay, every, True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        time.sleep(self.delay)
        if trainer.is_global_zero and (self.first or trainer.global_step % self.every == 0):
            print(f"test: {'first ' if self.first else ''}step {trainer.global_step}", flush=True)
        self.first = False


# ---- (1) the batch script ------------------------------------------------------------------

def render(capsys: pytest.CaptureFixture, *argv: str) -> str:
    from app import slurm

    assert slurm.main(["submit", "--dry-run", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.timeout(60)
def test_dry_run_cpu_one_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = render(capsys, "--config", TINY, "--tasks-per-node", "2", "--time", "0:10:00",
                    "--runs_dir", str(tmp_path / "runs"), "--", "--trainer.max_steps", "50")
    run_dir = tmp_path / "runs" / "image-tiny"
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=0:10:00",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={run_dir}/slurm-%j.out", f"#SBATCH --chdir={Path.cwd().resolve()}"):
        assert line + "\n" in script, line
    assert "gpus" not in script and "--signal=B:" not in script and "--export" not in script
    fit = script.split("srun ", 1)[1]
    assert fit.startswith(f"{sys.executable} -m app fit")
    for arg in (f"--config {TINY}", "--name image-tiny", f"--runs_dir {tmp_path / 'runs'}", "--ckpt_path last",
                "--trainer.accelerator cpu", "--trainer.devices 2", "--trainer.strategy ddp",
                "--trainer.num_nodes 1", "--trainer.max_steps 50"):
        assert arg in fit, arg
    assert not run_dir.exists()  # a dry run writes nothing
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


@pytest.mark.timeout(60)
def test_dry_run_two_nodes_eight_gpus(capsys: pytest.CaptureFixture) -> None:
    script = render(capsys, "--config", "configs/image/base.yaml", "--config", "configs/trainer/fsdp.yaml",
                    "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "12", "--partition", "gpu",
                    "--account", "proj", "--qos", "high", "--constraint", "h100", "--job-name", "big",
                    "--name", "big-run")
    for line in ("#SBATCH --job-name=big", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100"):
        assert line + "\n" in script, line
    fit = script.split("srun ", 1)[1]
    for arg in ("--config configs/image/base.yaml", "--config configs/trainer/fsdp.yaml", "--name big-run",
                "--trainer.accelerator gpu", "--trainer.devices 8", "--trainer.num_nodes 2"):
        assert arg in fit, arg
    assert "--trainer.strategy" not in fit  # the strategy comes from the configs (DDP by default, FSDP here)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.timeout(60)
def test_two_node_cpu_script_keeps_the_configs_strategy(capsys: pytest.CaptureFixture) -> None:
    script = render(capsys, "--config", TINY, "--config", "configs/trainer/ddp.yaml", "--nodes", "2")
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    fit = script.split("srun ", 1)[1]
    for arg in ("--trainer.accelerator cpu", "--trainer.devices 1", "--trainer.num_nodes 2"):
        assert arg in fit, arg
    assert "--trainer.strategy" not in fit  # configs/trainer/ddp.yaml's DDPStrategy (and its timeout) stays


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status, requeued", [(0, False), (2, False), (3, False), (4, True), (137, True)])
def test_script_requeues_when_a_rank_vanished(tmp_path: Path, capsys: pytest.CaptureFixture, status: int,
                                              requeued: bool) -> None:
    """The rendered script run by bash with stand-ins for srun (exits `status`) and scontrol (records its calls)."""
    script = tmp_path / "train.sbatch"
    script.write_text(render(capsys, "--config", TINY, "--name", "x", "--runs_dir", str(tmp_path / "runs"),
                             "--max-failures", "2"))
    (tmp_path / "runs/x").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {status}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$*\" >>{tmp_path}/calls\necho JobState=RUNNING\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7")
    calls = tmp_path / "calls"
    outs = []
    for attempt in (1, 2, 3):  # the third failure of the same job is not requeued (--max-failures 2)
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == status, done.stderr
        made = calls.read_text().count("requeue 7") if calls.exists() else 0
        assert made == (min(attempt, 2) if requeued else 0), done.stdout
        outs.append(done.stdout)
    said = f"training failed (exit {status}): requeueing job 7 (failure 1 of 2) to resume from the last checkpoint"
    assert (said in outs[0]) == requeued and "requeueing" not in outs[2]


@pytest.mark.timeout(60)
def test_dry_run_rejects_run_options_after_dashes(capsys: pytest.CaptureFixture) -> None:
    from app import slurm

    assert main(["slurm", "submit", "--config", TINY, "--dry-run", "--", "--name", "x"]) == 2
    assert "--name" in capsys.readouterr().err
    assert slurm.run_name([TINY], None) == "image-tiny"


@pytest.mark.timeout(60)
def test_trainer_configs_build_their_strategies() -> None:
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

    from models.blocks import DualStreamBlock, SingleStreamBlock

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    built = {}
    for name in ("ddp", "fsdp"):
        raw = yaml.safe_load((ROOT / f"configs/trainer/{name}.yaml").read_text())["trainer"]["strategy"]
        built[name] = parser.instantiate(parser.parse_object({"strategy": raw})).strategy
    assert isinstance(built["ddp"], DDPStrategy)
    fsdp = built["fsdp"]
    assert isinstance(fsdp, FSDPStrategy)
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {DualStreamBlock, SingleStreamBlock}


# ---- (2) the Preemption callback, in-process, no Slurm ---------------------------------------

@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """No SLURM_* variables, a recording `scontrol requeue`, and this process's signal handlers restored after."""
    from callbacks import preemption

    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    calls: list[str] = []
    monkeypatch.setattr(preemption, "requeue_job", lambda job: calls.append(job) or True)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    cli_signal_at().preemption = None
    yield calls
    for s, h in handlers.items():
        signal.signal(s, h)


def cli_signal_at() -> type[SignalAt]:
    """SignalAt as the CLI imports it (`tests.test_slurm`; pytest may import this file under another name)."""
    return importlib.import_module("tests.test_slurm").SignalAt


def fit(tmp_path: Path, shards: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, *SMALL, "--runs_dir", str(tmp_path / "runs"), "--name", "p",
                 "--data.train_shards", str(shards / "*.tar"), *extra])


def last_step(tmp_path: Path) -> int:
    ckpt = torch.load(tmp_path / "runs/p/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["global_step"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("job_id", [None, "4242"])
def test_preemption_checkpoints_stops_and_requeues_only_under_slurm(
        tmp_path: Path, image_shards: Path, no_slurm: list[str], monkeypatch: pytest.MonkeyPatch,
        job_id: str | None) -> None:
    if job_id:
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
    assert fit(tmp_path, image_shards, "--trainer.max_steps", "40",
               "--trainer.callbacks+=tests.test_slurm.SignalAt") == 0  # a clean stop, not an error
    assert last_step(tmp_path) == 5  # checkpoint at the step the signal arrived in, then stopped
    assert not list((tmp_path / "runs/p/checkpoints").glob("last-v*.ckpt"))
    cb = cli_signal_at().preemption
    assert cb.stopped_at == 5
    assert no_slurm == []  # the requeue waits for the process to exit
    cb.requeue_now()  # what atexit (or the timeout) does
    cb.requeue_now()
    assert no_slurm == ([job_id] if job_id else [])  # once, and never outside Slurm

    # the next run resumes from the checkpoint and finishes
    assert fit(tmp_path, image_shards, "--trainer.max_steps", "8", "--ckpt_path", "last") == 0
    assert last_step(tmp_path) == 8


@pytest.mark.timeout(120)
def test_array_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from callbacks.preemption import slurm_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "17"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "12_3"


@pytest.mark.timeout(120)
def test_auto_resume_without_checkpoint_starts_fresh(tmp_path: Path, image_shards: Path, no_slurm: list[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert fit(tmp_path, image_shards, "--trainer.max_steps", "3", "--ckpt_path", "last") == 0
    assert last_step(tmp_path) == 3
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text


# ---- (3) a real Slurm: signal, checkpoint, requeue, resume, finish ---------------------------

def free_port_pair() -> int:
    for port in range(21817, 29817, 17):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for the local Slurm")


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"local Slurm needed in CI: {reason}")
    pytest.skip(f"no local Slurm: {reason}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-node Slurm started by slurm/local-cluster.sh (installs Debian's packages when root), stopped after."""
    yield from local_cluster(tmp_path_factory, nodes=1)


def local_cluster(tmp_path_factory: pytest.TempPathFactory, nodes: int) -> Iterator[dict[str, str]]:
    """Starts slurm/local-cluster.sh with `nodes` nodes, yields the environment that points Slurm's commands at it."""
    have = shutil.which("sbatch") and os.path.exists("/usr/sbin/slurmd") and os.path.exists("/usr/sbin/munged")
    if not have and (os.geteuid() != 0 or not shutil.which("apt-get")):
        unavailable("Slurm is not installed and installing it needs root and apt-get "
                    "(apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        unavailable("slurm/local-cluster.sh needs root (slurmd starts jobs as their user)")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, LOCAL_SLURM_PORT=str(free_port_pair()), SLURM_CONF=str(state / "etc/slurm.conf"),
               LOCAL_SLURM_NODES=str(nodes))
    script = str(ROOT / "slurm/local-cluster.sh")
    start = subprocess.run([script, "start", str(state)], env=env, capture_output=True, text=True, timeout=300)
    if start.returncode != 0:
        subprocess.run([script, "stop", str(state)], env=env, capture_output=True, timeout=60)
        unavailable(f"slurm/local-cluster.sh start failed: {start.stderr.strip()[-500:]}")
    try:
        yield env
    finally:
        subprocess.run([script, "stop", str(state)], env=env, capture_output=True, timeout=60)


def wait_for(what: str, check: Any, timeout: float, log: Path | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def grep(log: Path, pattern: str) -> list[str]:
    return re.findall(pattern, log.read_text()) if log.exists() else []


@pytest.mark.timeout(240)
def test_preempt_requeue_resume_on_slurm(cluster: dict[str, str], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    assert main(["shards", "synthetic", "image", str(shards), "--num", "128", "--size", "16",
                 "--shard-size", "32"]) == 0
    max_steps = 300
    submit = subprocess.run(
        [sys.executable, "-m", "app", "slurm", "submit", "--config", TINY, "--gpus-per-node", "0",
         "--tasks-per-node", "2", "--name", "e2e", "--runs_dir", str(tmp_path / "runs"), "--time", "0:10:00",
         "--", *SMALL, "--data.train_shards", str(shards / "*.tar"), "--trainer.max_steps", str(max_steps),
         "--trainer.callbacks+=tests.test_slurm.SlowSteps"],
        cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    run = tmp_path / "runs" / "e2e"
    log = run / f"slurm-{job}.out"
    assert f"tail -f {log}" in submit.stdout

    try:
        check_round_trip(cluster, job, run, log, max_steps)
    finally:
        subprocess.run(["scancel", job], env=cluster, capture_output=True, timeout=30)  # no-op once finished


def check_round_trip(cluster: dict[str, str], job: str, run: Path, log: Path, max_steps: int) -> None:
    def slurm(*cmd: str) -> str:
        return subprocess.run(list(cmd), env=cluster, capture_output=True, text=True, timeout=30).stdout

    # first run: auto-resume finds no checkpoint and starts fresh; let it train a little
    wait_for("training steps", lambda: any(int(s) >= 20 for s in grep(log, r"test: step (\d+)")), 120, log)
    assert grep(log, r"fit starts at global_step=(\d+)") == ["0"]
    assert "starting fresh" in log.read_text()

    t_signal = time.monotonic()
    slurm("scancel", "--signal=USR1", job)  # to the job steps (the training processes), as --signal=USR1@90
    firsts = wait_for("the requeued run's first step", lambda: (f := grep(log, r"test: first step (\d+)"))[1:] and f,
                      120, log)
    round_trip = time.monotonic() - t_signal
    starts = grep(log, r"fit starts at global_step=(\d+)")
    saved = int(grep(log, r"SIGUSR1 received, saving .*last\.ckpt at global_step=(\d+)")[0])
    assert 20 <= saved < max_steps
    assert int(starts[1]) == saved  # the rerun continues from the checkpoint ...
    assert firsts == ["1", str(saved + 1)]  # ... its first step is the next one
    assert grep(log, r"requeued Slurm job (\d+)") == [job]
    assert "duoflow: job %s (restart 1)" % job in log.read_text()
    print(f"\nsignal -> resumed training: {round_trip:.1f} s (checkpoint at step {saved})")

    def finished() -> str:
        info = slurm("scontrol", "show", "job", job)
        return info if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY)", info) else ""

    info = wait_for("the job to finish", finished, 150, log)
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info and "Restarts=1" in info, info
    text = log.read_text()
    assert "Traceback" not in text and "exit code" not in text and "Terminated" not in text, text[-3000:]

    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == max_steps
    assert not list(ckpts.glob("last-v*.ckpt")) and not list(run.rglob("hpc_ckpt*"))  # Lightning's auto-requeue off
    wandb_id = (run / "wandb_id").read_text().strip()
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(p.name.endswith("-" + wandb_id) for p in sessions)  # one W&B run


@pytest.mark.timeout(150)
def test_scancel_checkpoints_and_stays_cancelled(cluster: dict[str, str], tmp_path: Path) -> None:
    """`scancel` also sends SIGTERM: the run saves its checkpoint, but a cancelled job is not requeued."""
    shards = tmp_path / "shards"
    assert main(["shards", "synthetic", "image", str(shards), "--num", "64", "--size", "16",
                 "--shard-size", "32"]) == 0
    submit = subprocess.run(
        [sys.executable, "-m", "app", "slurm", "submit", "--config", TINY, "--tasks-per-node", "2", "--name", "c",
         "--runs_dir", str(tmp_path / "runs"), "--", *SMALL, "--data.train_shards", str(shards / "*.tar"),
         "--trainer.max_steps", "3000", "--trainer.logger", "false", "--trainer.callbacks+=tests.test_slurm.SlowSteps"],
        cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    log = tmp_path / "runs" / "c" / f"slurm-{job}.out"

    def show() -> str:
        return subprocess.run(["scontrol", "show", "job", job], env=cluster, capture_output=True, text=True,
                              timeout=30).stdout

    try:
        wait_for("training steps", lambda: any(int(s) >= 10 for s in grep(log, r"test: step (\d+)")), 120, log)
        subprocess.run(["scancel", job], env=cluster, check=True, timeout=30)
        wait_for("the job to end", lambda: "JobState=CANCELLED" in show() and "COMPLETING" not in show(), 60, log)
        time.sleep(2)  # a wrongful requeue would show now
        info = show()
        assert "JobState=CANCELLED" in info and "Restarts=0" in info, info
        saved = grep(log, r"SIGTERM received, saving .*last\.ckpt at global_step=(\d+)")
        assert saved and "not requeueing" in log.read_text()
        ckpt = torch.load(log.parent / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == int(saved[0])
    finally:
        subprocess.run(["scancel", job], env=cluster, capture_output=True, timeout=30)


def test_submit_leaves_this_processes_wandb_service_out_of_the_job(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A W&B service started by the submitting process (a notebook, a script) puts its address in the
    environment; sbatch would export it to every rank, which would then log through a service they cannot
    reach (or one where a killed run's id is still in use)."""
    from app.slurm import submit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\nenv >{tmp_path}/job-env\necho 42\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_SERVICE", "2-123-tcp-localhost-45678")
    monkeypatch.setenv("MY_SETTING", "kept")
    assert submit("#!/bin/bash\n", tmp_path / "run") == "42"
    job_env = (tmp_path / "job-env").read_text().splitlines()
    assert "MY_SETTING=kept" in job_env and not any(line.startswith("WANDB_SERVICE=") for line in job_env)
