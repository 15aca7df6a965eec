"""Sample previews during training: generated with the EMA weights, written to the run
directory and sent to the experiment tracker (the preview image, and a few MP4/WAV files where the
logger can show them: W&B's ``log_image`` / ``log_video`` / ``log_audio``).

A text model whose config states no preview prompts is shown the first ``num`` distinct captions of
the validation (else training) shards (``ShardDataModule.preview_captions``): prompts in the data's
own words, the same at every preview. They are logged once, written beside each preview as
``<prefix>-prompts.txt`` (one per sample, in order) and sent as the tracker's captions."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.ema import find_ema
from callbacks.sharded import all_ranks_run, runnable
from datamodules.shards import ShardDataModule
from models.conditioning import TextConditionModule

log = logging.getLogger("duoflow.samples")


MEDIA_PANELS = {".mp4": ("log_video", "videos"), ".wav": ("log_audio", "audios")}
"""File suffix -> (logger method, its keyword for the files)."""
MAX_FILES = 4


def log_media(logger: Any, paths: list[Path], step: int, sample_rate: int | None = None,
              prompts: list[str] | None = None) -> None:
    """Send a preview's image (its last path, a PNG) and up to MAX_FILES media files per kind to the tracker;
    ``prompts`` (one per sample, in order) become their captions.

    Loggers without a method for a kind (not every Lightning logger shows video or audio) skip it."""
    if not paths:
        return
    if paths[-1].suffix == ".png" and hasattr(logger, "log_image"):
        extra = {"caption": [" | ".join(prompts)]} if prompts else {}
        logger.log_image(key="samples", images=[str(paths[-1])], step=step, **extra)
    for suffix, (method, keyword) in MEDIA_PANELS.items():
        files = [str(p) for p in paths if p.suffix == suffix][:MAX_FILES]
        if not files or not hasattr(logger, method):
            continue
        extra = {"sample_rate": [sample_rate] * len(files)} if suffix == ".wav" else {}
        if prompts:
            extra["caption"] = prompts[: len(files)]
        getattr(logger, method)(key=f"samples/{suffix[1:]}", **{keyword: files}, step=step, **extra)


class SamplePreview(L.Callback):
    def __init__(self, every_n_steps: int = 500, num: int = 16, steps: int = 25, cfg_scale: float | None = None,
                 seed: int = 0, at_end: bool = True):
        """
        Args:
            every_n_steps: Write a preview every n optimizer steps (0 = only at the end).
            num: Samples per preview; conditions cycle through the classes / preview prompts.
            steps: ODE steps per preview (fewer than for final samples, to stay cheap).
            cfg_scale: Guidance scale; None = the model's default.
            seed: Noise seed, fixed so previews are comparable across steps.
            at_end: Also write one when training ends.
        """
        self.every_n_steps = every_n_steps
        self.num = num
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.at_end = at_end
        self.last_step = -1
        self.captions: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the preview prompts of a text model from the shards' captions (used when its config states none)."""
        cond = pl_module.cond
        if isinstance(cond, TextConditionModule) and not cond.prompts and isinstance(trainer.datamodule, ShardDataModule):
            self.captions = trainer.datamodule.preview_captions(self.num)
            log.info("preview prompts (the first %d distinct captions of the shards): %s", len(self.captions),
                     "; ".join(self.captions) or "none found, the empty caption")

    def out_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "samples"

    def preview(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Sample and write the previews (rank 0). Under FSDP every rank samples, since each block gathers
        its weights collectively; rank 0 writes."""
        if not (trainer.is_global_zero or all_ranks_run(trainer)) or trainer.global_step == self.last_step:
            return []
        self.last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        ema = find_ema(trainer)
        try:
            with ema.swapped(pl_module) if ema is not None else nullcontext(), runnable(trainer):
                x, cond = self.generate(pl_module)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return []
        prefix = f"step{trainer.global_step:07d}"
        paths = pl_module.save_media(x, self.out_dir(trainer), prefix=prefix)
        prompts = list(cond["txt"]) if "txt" in cond else None
        if prompts:
            (self.out_dir(trainer) / f"{prefix}-prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        log.info("samples at step %d: %s", trainer.global_step, paths[-1])
        if trainer.logger is not None:
            log_media(trainer.logger, paths, trainer.global_step, pl_module.sample_rate, prompts)
        return paths

    def generate(self, pl_module: L.LightningModule) -> tuple[Any, dict[str, Any]]:
        """(the samples, the conditions they were made with)."""
        cond = pl_module.cond.preview(self.num, self.captions)
        return pl_module.generate(cond, self.num, steps=self.steps, cfg_scale=self.cfg_scale, seed=self.seed), cond

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.preview(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.preview(trainer, pl_module)
