"""Stop cleanly when the job is about to be killed: checkpoint, requeue (under Slurm), exit 0.

Slurm sends SIGUSR1 `--signal=USR1@90` seconds before the time limit (and SIGTERM on preemption).
The signal handler only records the request. At the next optimizer-step boundary every rank
joins one collective decision (so all ranks stop at the same step), all ranks take part in one
atomic save of `<run>/checkpoints/last.ckpt`, and the trainer stops. Rank 0 runs
`scontrol requeue <job>` when its process exits, after the W&B run is closed (a requeue
SIGTERMs every process of the job, W&B's service included), or `requeue_timeout` seconds after
the checkpoint if the process has not exited by then. The requeued job starts `fit` again; the CLI
sees SLURM_RESTART_COUNT > 0 and resumes from last.ckpt into the same W&B run.

Outside Slurm (no SLURM_JOB_ID) the same signals still checkpoint and stop; nothing is requeued.
Lightning's own SLURM auto-requeue is switched off here: it would save a second checkpoint from
inside the signal handler and requeue without the other ranks.

Place this callback after the callbacks that change state in `on_train_batch_end` (EMA), so the
checkpoint includes this step's update; ModelCheckpoint callbacks run after it anyway.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.checkpoint import CheckpointNotSaved, failed_save, save_together

log = logging.getLogger("duoflow.preemption")


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: `<array job>_<task>` for array jobs, else SLURM_JOB_ID (None outside Slurm)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


def job_state(job_id: str) -> str | None:
    """The job's state as `scontrol show job` reports it (RUNNING, CANCELLED, TIMEOUT, ...), None if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"JobState=(\w+)", out.stdout)
    return found.group(1) if found else None


def requeue_job(job_id: str) -> bool:
    """`scontrol requeue JOB`: Slurm ends this run of the job and queues it again. True on success.

    Only a job that is still RUNNING is requeued (SIGUSR1 before the time limit, SIGTERM at the start of a
    preemption grace time). A job Slurm is already ending (COMPLETING: `scancel`, which sends SIGTERM too,
    or the time limit itself) is left to end: requeueing it would undo a user's scancel."""
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise ValueError(f"not a Slurm job id: {job_id!r}")
    state = job_state(job_id)
    if state not in (None, "RUNNING"):
        log.info("preemption: Slurm job %s is %s (cancelled or past its limit): not requeueing it; "
                 "resume by hand with --ckpt_path last", job_id, state)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("preemption: scontrol requeue %s failed: %s", job_id, e)
        return False
    if result.returncode != 0:
        log.error("preemption: scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    return True


class Preemption(L.Callback):
    def __init__(self, signals: list[str] | None = None, requeue: bool = True, requeue_timeout: float = 60.0):
        """
        Args:
            signals: Signals that ask for checkpoint-and-stop (default SIGUSR1 and SIGTERM).
            requeue: Under Slurm, requeue the job after the checkpoint (rank 0 runs `scontrol requeue`).
            requeue_timeout: Requeue at the latest this many seconds after the checkpoint, even if the
                process is still shutting down (keep it below the `--signal=USR1@90` lead time).
        """
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s)
                        for s in (signals or ["SIGUSR1", "SIGTERM"])]
        self.requeue = requeue
        self.requeue_timeout = requeue_timeout
        self.pending_job: str | None = None  # job to requeue when this process exits (rank 0)
        self._timer: threading.Timer | None = None
        self._lock: threading.Lock | None = None  # made when a requeue is scheduled (keeps the callback picklable)
        self.received: int = 0  # the last signal number received, 0 = none; written by the handler only
        self.stopped_at: int | None = None  # global step of the preemption checkpoint
        self._previous: dict[signal.Signals, Any] = {}

    # ---- signals: the handler records, the training loop acts ---------------------------

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def install_handlers(self) -> None:
        for sig in self.signals:
            if signal.getsignal(sig) != self._record:
                self._previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._record)

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            env.auto_requeue = False  # we checkpoint and requeue ourselves, collectively
        # early, so that data-loader workers forked later inherit a handler instead of dying on SIGUSR1
        self.install_handlers()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # again: Lightning registers its own SIGTERM handler after setup; ours replaces it for the
        # training loop (Lightning's would raise out of the loop with exit code 1, without a checkpoint)
        self.install_handlers()
        if trainer.is_global_zero:
            log.info("preemption: fit starts at global_step=%d (SLURM_JOB_ID=%s, SLURM_RESTART_COUNT=%s)",
                     trainer.global_step, os.environ.get("SLURM_JOB_ID", "-"),
                     os.environ.get("SLURM_RESTART_COUNT", "0"))

    # ---- the decision, at optimizer-step boundaries ---------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stopped_at is not None or (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        # every rank joins this all-reduce each step: the ranks that got no signal learn that one did
        if not trainer.strategy.reduce_boolean_decision(self.received != 0, all=False):
            return
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        path = self.checkpoint_path(trainer)
        if trainer.is_global_zero:
            log.info("preemption: %s received, saving %s at global_step=%d", name, path, trainer.global_step)
        owners = [cb for cb in trainer.checkpoint_callbacks
                  if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath) == Path(path).parent]
        for cb in owners:  # saved in the checkpoint: the resumed run keeps writing last.ckpt, not last-v1.ckpt
            cb.last_model_path = path
        # all ranks: sharded strategies gather or write their shards; a failure for lack of room stops every rank
        error = save_together(trainer, lambda: trainer.save_checkpoint(path))
        if error is not None:  # nothing to requeue from: stop, and say so in the exit code
            raise CheckpointNotSaved(f"{failed_save(error, Path(path).parent)}; the preemption save at step "
                                     f"{trainer.global_step} failed, the job is not requeued") from error
        self.stopped_at = trainer.global_step
        for cb in owners:  # and no second save of this step when training ends
            cb._last_global_step_saved = trainer.global_step
        job = slurm_job_id()
        if trainer.is_global_zero:
            if self.requeue and job:
                self.schedule_requeue(job)
            else:
                log.info("preemption: not requeueing (%s); resume with --ckpt_path last",
                         "requeue disabled" if job else "not a Slurm job")
        trainer.should_stop = True

    # ---- the requeue, once, when the process exits (or after requeue_timeout) ---------------

    def schedule_requeue(self, job: str) -> None:
        log.info("preemption: Slurm job %s will be requeued when training has shut down (at the latest in %.0f s)",
                 job, self.requeue_timeout)
        self.pending_job = job
        self._lock = threading.Lock()
        atexit.register(self.requeue_now)
        self._timer = threading.Timer(self.requeue_timeout, self.requeue_now)
        self._timer.daemon = True
        self._timer.start()

    def requeue_now(self) -> None:
        if self._lock is None:
            return
        with self._lock:  # the timer and atexit may race: requeue once
            job, self.pending_job = self.pending_job, None
        if job is None:
            return
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if requeue_job(job):
            log.info("preemption: requeued Slurm job %s; the next run resumes from last.ckpt", job)

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> str:
        """The run's last.ckpt: where its ModelCheckpoint keeps `last`, else <default_root_dir>/checkpoints."""
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
        return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A fit that raises skips `teardown`, and Lightning's own teardown then re-installs what it found
        when it registered its handlers: ours. Restore the handlers from before the fit and make Lightning
        restore those too, so a later SIGTERM to this process (a test session, a notebook) is not swallowed."""
        previous = dict(self._previous)
        self.restore_handlers()
        remembered = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(remembered, dict):  # a private attribute of Lightning's: left alone if it ever changes
            for sig, handler in previous.items():
                if remembered.get(sig) == self._record:
                    remembered[sig] = handler if handler is not None else signal.SIG_DFL

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.stopped_at is None:
            self.restore_handlers()
        else:
            # the requeue SIGTERMs every process of the job; the checkpoint is saved, so ignore it and
            # exit 0 (SIG_IGN, unlike a Python handler, also holds during interpreter shutdown)
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)
