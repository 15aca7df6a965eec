"""Mixed image sizes: what each batching policy wastes, measured through the real data pipeline.

Synthetic shapes on canvases of mixed sizes and aspect ratios (`shards synthetic image-mixed`)
go through ShardDataModule -> ImageTransform -> batches, three ways:

- crop: the classic fixed square (resize the shorter side, centre crop): no padding, but the
  pixels outside the square are thrown away (reported as the cropped fraction);
- pad: keep the aspect ratio, fixed batch_size, pad every sample to the longest in its batch
  (what a padded trainer runs): the padding fraction of the tokens that attention would process;
- budget+pack (ours): keep the aspect ratio, close batches at a token budget, pack the samples
  end to end (block-diagonal attention): nothing cropped, nothing padded; reported with how full
  the budget is and the samples per batch.

The compute side (tokens/s packed vs padded through the backbone) is bench/packing.py.

    python bench/variable_sizes.py
"""

from __future__ import annotations

import itertools
import statistics
import tempfile

import torch

from bench_path import REPO  # noqa: F401
from common import report, table
from datamodules.shards import ShardDataModule
from datamodules.synthetic import write_synthetic
from datamodules.transforms import ImageTransform


def batches(shards: str, n: int, **kwargs) -> list[dict]:
    module = ShardDataModule(shards, num_workers=0, **kwargs)
    return list(itertools.islice(iter(module.train_dataloader()), n))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="synthetic samples written")
    ap.add_argument("--size", type=int, default=32, help="side of the square of the same area (pixels)")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40, help="batches measured per policy")
    args = ap.parse_args()
    p, budget = args.patch, args.batch_size * (args.size // args.patch) ** 2
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic("image-mixed", tmp, num=args.samples, shard_size=250, image_size=args.size, progress=False)
        shards = f"{tmp}/*.tar"
        sources = [s for b in batches(shards, args.batches, batch_size=args.batch_size,
                                      transform=ImageTransform(size=args.size, keep_aspect=True, multiple=1,
                                                               max_aspect=100.0)) for s in b["x"]]
        cropped = statistics.mean(1 - min(x.shape[1:]) ** 2 / (x.shape[1] * x.shape[2]) for x in sources)
        keep = ImageTransform(size=args.size, keep_aspect=True, multiple=p)
        pad_real = pad_run = 0
        for b in batches(shards, args.batches, batch_size=args.batch_size, transform=keep):
            tokens = [keep.cost({"x": x}) for x in b["x"]]
            pad_real, pad_run = pad_real + sum(tokens), pad_run + len(tokens) * max(tokens)
        packed = batches(shards, args.batches, batch_size=4 * args.batch_size, batch_budget=budget, transform=keep)
        fills = [sum(keep.cost({"x": x}) for x in b["x"]) / budget for b in packed]
        sizes = [len(b["x"]) for b in packed]
    rows = [
        ["crop (square, fixed batch)", f"{cropped:.1%} of pixels thrown away", "0%", args.batch_size, "-"],
        ["pad (keep aspect, fixed batch)", "0%", f"{1 - pad_real / pad_run:.1%}", args.batch_size, "-"],
        ["budget + pack (ours)", "0%", "0%", f"{statistics.mean(sizes):.1f}", f"{statistics.mean(fills):.1%}"],
    ]
    body = table(["policy", "cropped", "padding fraction", "samples / batch", "budget fill"], rows)
    report("variable_sizes", torch.device("cpu"),
           dict(samples=args.samples, size=args.size, patch=p, batch_size=args.batch_size, budget_tokens=budget,
                batches=args.batches), body)


if __name__ == "__main__":
    main()
