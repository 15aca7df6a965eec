"""A training step through Lightning vs the bare step of the same module (issue 17: within 10%).

The product path is `FlowMatchingModule.training_step` run by a Lightning Trainer: the non-finite
guard (one host read), gradient clipping, the LR schedule, logging, and configs/image/base.yaml's
callbacks (EMA, Throughput, NonFiniteGuard, Preemption, RunCheckpoint with no save inside the timed
steps), a progress bar and a logger. The bare step is forward, backward and the same AdamW
(`models.training.adamw_with_warmup`) on the same module. Both move the same cached batch to the
device at every step, so the data loader is not measured (bench/input_pipeline.py does that).

Rounds alternate: N bare steps, then one Lightning fit of W + N steps, its last N timed (from the
start of the first timed batch to the end of training, the device synchronised at both ends).

    python bench/lightning_step.py                      # CPU: the step_vs_diffusers cpu preset's size
    python bench/lightning_step.py --compile
    python bench/lightning_step.py --device cuda --preset gpu --compile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from bench_path import REPO  # noqa: F401
from callbacks.checkpoint import RunCheckpoint
from callbacks.ema import EMA
from callbacks.guards import NonFiniteGuard
from callbacks.preemption import Preemption
from callbacks.throughput import Throughput
from common import median, report, sync, table
from models.backbone import MMDiTConfig
from models.conditioning import ClassLabel
from models.generators import ImageFlow, OptimConfig
from models.tokenizers.image import ImagePatches
from models.training import adamw_with_warmup

PRESETS = {
    "cpu": dict(dim=256, heads=4, depth_dual=4, depth_single=0, size=32, patch=2, batch=4),
    "gpu": dict(dim=1024, heads=16, depth_dual=12, depth_single=12, size=64, patch=2, batch=32),
}


def build(p: dict, compile: bool) -> ImageFlow:
    torch.manual_seed(0)
    return ImageFlow(
        tokenizer=ImagePatches(channels=3, size=p["size"], patch=p["patch"]),
        conditioning=ClassLabel(num_classes=10),
        backbone=MMDiTConfig(dim=p["dim"], heads=p["heads"], depth_dual=p["depth_dual"],
                             depth_single=p["depth_single"], compile=compile),
        cond_drop=0.1,
        optim=OptimConfig(lr=1e-4, warmup_steps=0, grad_clip=1.0),
    )


class Same(torch.utils.data.IterableDataset):
    """One host batch, served forever (no decode, no collate: the loader costs nothing)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


class Timer(L.Callback):
    """Seconds per step over the steps after `warmup`, the device synchronised at both ends."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.t0, self.per_step = warmup, device, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        sync(self.device)
        self.per_step = (time.perf_counter() - self.t0) / (trainer.global_step - self.warmup)


def product_callbacks(run_dir: str, peak_flops: float | None) -> list[L.Callback]:
    """configs/image/base.yaml's callbacks less SamplePreview (it samples every 5000 steps, not in a timed window)."""
    return [RunCheckpoint(every_n_train_steps=10**9, dirpath=f"{run_dir}/ckpt"), EMA(decay=0.9999),
            Throughput(peak_flops=peak_flops), NonFiniteGuard(), Preemption(requeue=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default cpu on CPU, gpu on CUDA")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="MMDiTConfig.compile (both paths)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them in each Lightning fit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="Throughput's MFU (e.g. 989 for H100 bf16)")
    args = ap.parse_args()
    device = torch.device(args.device)
    p = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    model = build(p, args.compile)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(p["batch"], 3, p["size"], p["size"], generator=g) * 2 - 1,
             "cls": torch.randint(0, 10, (p["batch"],), generator=g)}

    model.to(device).train()
    opt = adamw_with_warmup(model, model.optim)["optimizer"]
    noise = torch.Generator(device=device).manual_seed(0)

    def bare_step() -> None:
        on_device = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model.loss(on_device, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fit(callbacks: list[L.Callback], run_dir: str, logged: bool) -> float:
        timer = Timer(args.warmup, device)
        trainer = L.Trainer(
            max_steps=args.warmup + args.steps, accelerator=device.type, devices=1, precision=precision,
            logger=CSVLogger(run_dir) if logged else False, log_every_n_steps=1 if logged else 50,
            enable_checkpointing=any(isinstance(c, RunCheckpoint) for c in callbacks),
            enable_progress_bar=logged, enable_model_summary=False, callbacks=[timer, *callbacks],
        )
        trainer.fit(model, torch.utils.data.DataLoader(Same(batch), batch_size=None))
        return timer.per_step

    for _ in range(args.warmup):
        bare_step()
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else None
        for r in range(args.rounds):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                bare_step()
            sync(device)
            times.setdefault("bare step (forward, backward, AdamW)", []).append((time.perf_counter() - t0) / args.steps)
            times.setdefault("Lightning, no callbacks, no logger", []).append(fit([], f"{tmp}/plain{r}", False))
            times.setdefault("Lightning + base.yaml callbacks, progress bar, logger every step", []).append(
                fit(product_callbacks(f"{tmp}/product{r}", peak), f"{tmp}/product{r}", True))

    bare = median(next(iter(times.values())))
    rows = [[name, median(t) * 1e3, median(t) / bare] for name, t in times.items()]
    worst = max(median(t) for t in times.values()) / bare
    body = table(["path", "ms per step (median of rounds)", "ratio to the bare step"], rows)
    body += f"\n\n**the product path / bare step = {worst:.3f}** (bar <= 1.10)"
    config = dict(**p, compile=args.compile, precision=precision, steps=args.steps, warmup=args.warmup,
                  rounds=args.rounds, optimizer="adamw_with_warmup (fused AdamW), grad_clip=1.0 in Lightning",
                  params=sum(q.numel() for q in model.parameters()))
    report("lightning_step" + ("_compile" if args.compile else ""), device, config, body)


if __name__ == "__main__":
    main()
