"""Is the input pipeline the bottleneck? Loader samples/s (0/1/2 workers) vs the tiny model's training rate.

Synthetic image shards (datamodules.synthetic.write_synthetic) go to a temp dir; ShardDataModule
serves them exactly as in training (shuffle buffer, PNG decode, ImageTransform, collate). The
model is configs/image/tiny.yaml's: ImageFlow, ImagePatches(size 32, patch 4), ClassLabel(4),
MMDiT dim 128, heads 4, depth 3 dual + 1 single, batch 32, AdamW + grad clip 1.0.

All contenders are measured in rounds in one process: loader(0), loader(1), loader(2), model
step on a cached batch, and the real training loop (loader feeding the model) per worker count.
Before a loader's timed batches, the batches its workers prefetched while idle are drained.

    python bench/input_pipeline.py
    python bench/input_pipeline.py --device cuda      # model on the GPU, loader on the CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Iterator

import torch

from bench_path import REPO  # noqa: F401
from common import median, report, table
from datamodules.shards import ShardDataModule
from datamodules.synthetic import write_synthetic
from datamodules.transforms import ImageTransform
from models.backbone import MMDiTConfig
from models.conditioning import ClassLabel
from models.generators import ImageFlow, OptimConfig
from models.tokenizers.image import ImagePatches

PREFETCH = 2  # DataLoader's default prefetch_factor


def endless(loader) -> Iterator[dict]:
    while True:
        yield from loader


def tiny_model() -> ImageFlow:
    """configs/image/tiny.yaml's model."""
    return ImageFlow(
        tokenizer=ImagePatches(channels=3, size=32, patch=4),
        conditioning=ClassLabel(num_classes=4),
        backbone=MMDiTConfig(dim=128, heads=4, depth_dual=3, depth_single=1, rope_axes=2),
        cond_drop=0.1,
        optim=OptimConfig(lr=1e-3, warmup_steps=100, grad_clip=1.0),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="where the model trains; the loader always runs on the CPU")
    ap.add_argument("--samples", type=int, default=1000, help="synthetic samples written")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--default-workers", type=int, default=1, help="configs/image/tiny.yaml's data.num_workers")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per contender per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic("image", tmp, num=args.samples, shard_size=max(1, args.samples // 8), progress=False)
        loaders = {}
        for w in args.workers:
            dm = ShardDataModule(train_shards=tmp, batch_size=args.batch, num_workers=w, shuffle_buffer=500,
                                 transform=ImageTransform(size=32))
            loaders[w] = endless(dm.train_dataloader())

        torch.manual_seed(0)
        model = tiny_model().to(device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))

        def train_step(batch: dict) -> None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = model.loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        cached = next(loaders[args.workers[0]])
        for _ in range(2):  # warm-up: workers started, AdamW state allocated
            train_step(cached)
            for it in loaders.values():
                next(it)

        rates: dict[str, list[float]] = {}

        def timed(name: str, fn, n: int) -> None:
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            rates.setdefault(name, []).append(n * args.batch / (time.perf_counter() - t0))

        for _ in range(args.rounds):
            for w, it in loaders.items():
                for _ in range(PREFETCH * w):  # drain what the workers prefetched while idle
                    next(it)
                timed(f"loader, {w} workers", lambda it=it: next(it), args.batches)
            timed("model step (cached batch)", lambda: train_step(cached), args.batches)
            for w, it in loaders.items():
                for _ in range(PREFETCH * w):
                    next(it)
                timed(f"training loop, {w} workers", lambda it=it: train_step(next(it)), args.batches)

    model_rate = median(rates["model step (cached batch)"])
    rows = [[name, median(r), median(r) / model_rate] for name, r in rates.items()]
    body = table(["contender", "samples/s (median of rounds)", "ratio to model step"], rows)
    d = args.default_workers
    if d in loaders:
        loader_rate, loop_rate = median(rates[f"loader, {d} workers"]), median(rates[f"training loop, {d} workers"])
        verdict = "IS" if loader_rate < model_rate else "is NOT"
        body += (
            f"\n\nAt the default {d} worker(s) the loader alone gives {loader_rate:.0f} samples/s and the model "
            f"consumes {model_rate:.0f} samples/s ({loader_rate / model_rate:.0f}x headroom): the loader **{verdict}** "
            f"the bottleneck. The training loop fed by it reaches {loop_rate:.0f} samples/s "
            f"({loop_rate / model_rate:.2f} of the cached-batch rate; on 2 shared cores the workers also take CPU "
            f"from the model)."
        )
    config = dict(model="configs/image/tiny.yaml (ImageFlow 32px patch 4, dim 128, heads 4, depth 3+1)",
                  batch=args.batch, model_device=args.device, shards=f"{args.samples} synthetic PNG samples",
                  shuffle_buffer=500, batches_per_round=args.batches, rounds=args.rounds,
                  cpu_threads=torch.get_num_threads())
    report("input_pipeline", device, config, body)


if __name__ == "__main__":
    main()
