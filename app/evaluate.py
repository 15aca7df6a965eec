"""`duoflow evaluate`: sample-quality metrics of a generator against held-out real data.

    duoflow evaluate --ckpt runs/image-digits/checkpoints/last.ckpt --data data/digits/test --num 500

Generates N samples, class-balanced over the conditioning classes, reads N real samples of the
held-out shards (--data), and compares them with the modality's `Evaluator` (app/evaluation/evaluators.py),
chosen from the generator's class. Everything the metrics need beyond the two sample sets is built
from the TRAINING shards (the checkpoint's `data.train_shards`, or --reference), e.g. the image and
video-frame feature networks (app/evaluation/feature_net.py). Scales: --untrained scores the same
architecture with fresh weights (the worst case: noise), --real-reference scores N training
samples against the held-out ones (about the best a generator of the data distribution can get).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from app.errors import UserError
from app.evaluation.evaluators import known_labels
from app.evaluation.modalities import evaluator_for
from app.evaluation.run import evaluate_generator
from datamodules.media.files import atomic_write_text
from datamodules.shards import expand_shards, read_samples

log = logging.getLogger("duoflow.eval")


# ---------------------------------------------------------------- the command


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="duoflow evaluate", description="Sample-quality metrics of a generator against "
                                 "held-out real data (images: FID, precision/recall, CAS; video: per-frame FD, shape "
                                 "accuracy, temporal consistency; audio: log-mel FD, timbre, pitch, voicing; 3D: "
                                 "coverage, MMD, class accuracy; audio-video: contact/onset sync).")
    ap.add_argument("--ckpt", required=True, help="generator checkpoint, e.g. runs/image-digits/checkpoints/last.ckpt")
    ap.add_argument("--data", required=True, help="HELD-OUT real shards (folder, glob or brace pattern)")
    ap.add_argument("--reference", default=None, help="TRAINING shards, for the feature net and --real-reference "
                    "(default: the checkpoint's data.train_shards)")
    ap.add_argument("--num", type=int, default=500, help="samples per side, capped by the held-out set (default 500)")
    ap.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's sampler)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed, also the feature net's (default 0)")
    ap.add_argument("--batch-size", type=int, default=100, help="samples generated per batch (default 100)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    ap.add_argument("--untrained", action="store_true", help="score the same architecture with fresh weights")
    ap.add_argument("--real-reference", action="store_true", help="also score N training samples as if generated")
    ap.add_argument("--feature-steps", type=int, default=300, help="training steps of a new feature net (default 300)")
    ap.add_argument("--feature-net", default=None, help="feature net file (default: feature-net.pt by the training shards)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def train_shards_of(ckpt: dict, path: str) -> str | list[str]:
    """`data.train_shards` of the run config stored in the checkpoint."""
    from app.sample import run_config

    shards = (run_config(ckpt).get("data") or {}).get("train_shards")
    if not shards:
        raise UserError(f"--ckpt {path}: records no data.train_shards; pass the training shards with --reference")
    return shards


def fresh_copy(model: Any, seed: int) -> Any:
    """The same architecture with freshly initialised weights (seeded), in eval mode on the same device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(**model.hparams)
    return fresh.to(model.device).eval()


def print_table(columns: dict[str, dict[str, float]], descriptions: dict[str, str]) -> None:
    names = list(dict.fromkeys(k for scores in columns.values() for k in scores))
    width = max(12, *(len(c) + 2 for c in columns))
    first = max(10, *(len(n) for n in names))
    print("metric".ljust(first) + "".join(c.rjust(width) for c in columns))
    for name in names:
        values = "".join((f"{s[name]:.4f}" if name in s else "-").rjust(width) for s in columns.values())
        print(name.ljust(first) + values + "   " + descriptions.get(name, ""))


def check_args(args: argparse.Namespace) -> None:
    if args.num < 10:
        raise UserError(f"--num {args.num}: expected at least 10 samples (precision/recall need more than k=3 neighbours)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive number")


def warn_overlap(data: str, train_shards: str | list[str]) -> None:
    """Held-out shards that are also training shards make the metrics reward memorisation: say so."""
    overlap = {Path(u).resolve() for u in expand_shards(data)} & {Path(u).resolve() for u in expand_shards(train_shards)}
    if overlap:
        print(f"warning: --data {data} shares {len(overlap)} shard(s) with the training shards {train_shards}; "
              "pass a held-out split")


def main(argv: list[str]) -> int:
    from app.sample import load_generator, read_checkpoint

    args = parse(argv)
    check_args(args)
    start = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = read_checkpoint(args.ckpt)
    train_shards = args.reference or train_shards_of(ckpt, args.ckpt)
    warn_overlap(args.data, train_shards)
    model, used_ema = load_generator(args.ckpt, device, ema=not args.no_ema, ckpt=ckpt)
    weights = "ema" if used_ema else "raw"
    if args.untrained:
        model, weights = fresh_copy(model, args.seed), "untrained"
    evaluator = evaluator_for(model)(model, train_shards, device, seed=args.seed, feature_steps=args.feature_steps,
                                     feature_net=args.feature_net)
    real = read_samples(args.data, evaluator.transform(), args.num)
    num = len(real["__key__"])
    if num < 10:
        raise UserError(f"--data {args.data}: {num} readable samples; expected at least 10")
    if num < args.num:
        print(f"note: {args.data} holds {num} samples: N={num} on both sides")
    reference = evaluator.reference(real)
    t0 = time.perf_counter()
    scores = evaluate_generator(evaluator, model, real, reference, num, args.steps, args.cfg_scale, args.seed,
                                args.batch_size)
    result = {
        "checkpoint": str(args.ckpt), "generator": f"{type(model).__module__}.{type(model).__name__}",
        "step": ckpt.get("global_step"), "weights": weights, "data": args.data, "train_shards": train_shards, "num": num,
        "steps": args.steps or getattr(model.sampler, "steps", None),
        "cfg_scale": model.cfg_scale if args.cfg_scale is None else args.cfg_scale, "seed": args.seed,
        "metrics": scores, **evaluator.info(), "seconds": {"generate_and_score": round(time.perf_counter() - t0, 2)},
    }
    columns = {f"generator ({weights})": scores}
    if args.real_reference:  # N training samples in place of generated ones; their cas is a TRAINING accuracy
        train = read_samples(train_shards, evaluator.transform(), num)
        result["real_reference"] = columns["real reference"] = evaluator.scores(
            evaluator.as_generated(train), known_labels(train), reference)
    result["seconds"]["total"] = round(time.perf_counter() - start, 2)
    print(f"{args.ckpt} (step {result['step']}, {weights} weights) vs {args.data}: N={num}, "
          f"ODE steps {result['steps']}, cfg {result['cfg_scale']}")
    print_table(columns, evaluator.descriptions)
    if args.real_reference:
        print("real reference: N training samples scored as if generated (the floor of the distances; a classifier's "
              "accuracy on them is measured on its own training data, so compare it with the real_ ceiling instead)")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
