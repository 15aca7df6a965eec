"""Sample-quality metrics during training: the `duoflow evaluate` code every n steps, EMA weights.

Logs ``eval/<metric>`` (e.g. ``eval/fid``, ``eval/cas``) to the trainer's loggers. Runs on rank 0
only, while the other ranks wait at their next collective: keep `num` and `steps` small (a few
hundred samples, ~20 ODE steps) so an evaluation takes seconds to a minute. The evaluator (for
images: the feature net, trained once on the run's training shards and cached next to them)
and the held-out reference are built at the first evaluation and reused.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch

from app.evaluation.modalities import evaluator_for
from app.evaluation.run import evaluate_generator
from callbacks.ema import find_ema
from callbacks.sharded import all_ranks_run, runnable
from datamodules.shards import read_samples

log = logging.getLogger("duoflow.eval")


class Evaluation(L.Callback):
    def __init__(self, every_n_steps: int, num: int, data: str, steps: int = 20, cfg_scale: float | None = None,
                 seed: int = 0, batch_size: int = 100, feature_steps: int = 300, feature_net: str | None = None,
                 at_end: bool = True):
        """
        Args:
            every_n_steps: Evaluate every n optimizer steps.
            num: Generated and held-out samples per evaluation (fewer if the held-out set is smaller).
            data: HELD-OUT real shards (never the training shards), e.g. data/digits/test.
            steps: ODE steps per sample (fewer than for final samples, to stay cheap).
            cfg_scale: Guidance scale; None = the model's default.
            seed: Noise seed, fixed so evaluations are comparable across steps.
            batch_size: Samples generated per batch.
            feature_steps: Training steps of the evaluator's feature net (when it trains one).
            feature_net: Its file; None = feature-net.pt next to the training shards.
            at_end: Also evaluate when training ends.
        """
        if every_n_steps < 1 or num < 10:
            raise ValueError(f"Evaluation: every_n_steps={every_n_steps}, num={num}; expected >= 1 and >= 10")
        self.every_n_steps, self.num, self.data, self.steps = every_n_steps, num, data, steps
        self.cfg_scale, self.seed, self.batch_size = cfg_scale, seed, batch_size
        self.feature_steps, self.feature_net, self.at_end = feature_steps, feature_net, at_end
        self.evaluator: Any = None
        self.held_out: dict[str, Any] = {}
        self.reference: Any = None
        self.last_step = -1
        self.last_scores: dict[str, float] = {}

    def setup_evaluator(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:

        train_shards = getattr(trainer.datamodule, "train_shards", None)
        if train_shards is None:
            raise ValueError("Evaluation callback: needs a ShardDataModule (its train_shards train the metric networks)")
        klass = evaluator_for(pl_module)
        self.evaluator = klass(pl_module, train_shards, pl_module.device, seed=self.seed, progress=False,
                               feature_steps=self.feature_steps, feature_net=self.feature_net)
        self.held_out = read_samples(self.data, self.evaluator.transform(), self.num)
        self.reference = self.evaluator.reference(self.held_out)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score samples of the (EMA) model against the held-out data; rank 0 logs. Under FSDP every rank
        runs it (each block gathers its weights collectively), with the same seeds."""
        if not (trainer.is_global_zero or all_ranks_run(trainer)):
            return {}

        if trainer.global_step == self.last_step:
            return self.last_scores
        self.last_step = trainer.global_step
        with torch.random.fork_rng(devices=[]):  # the training RNG streams continue as without evaluation
            if self.evaluator is None:
                self.setup_evaluator(trainer, pl_module)
            ema = find_ema(trainer)
            swap = ema.swapped(pl_module) if ema is not None else nullcontext()
            with swap, runnable(trainer):
                scores = evaluate_generator(self.evaluator, pl_module, self.held_out, self.reference,
                                            len(self.held_out["__key__"]), self.steps, self.cfg_scale, self.seed,
                                            self.batch_size, progress=False)
        self.last_scores = scores
        if not trainer.is_global_zero:
            return scores
        metrics = {f"eval/{k}": v for k, v in scores.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("evaluation at step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step > 0:
            self.evaluate(trainer, pl_module)

