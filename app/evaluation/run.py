"""Generating samples for evaluation and scoring them: shared by `duoflow evaluate` (app/evaluate.py)
and the in-loop callback (app/evaluation/callback.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from app.evaluation.evaluators import Evaluator, known_labels


def conditions_for(model: Any, num: int, real: dict[str, Any] | None = None) -> tuple[dict[str, Any], Tensor | None]:
    """Conditions for `num` samples and the class each stands for (None when there is none).

    Class-conditional: classes 0..K-1 in turn (balanced). Text-conditional: the captions of the
    real held-out samples (their labels, when they have any). Otherwise the model's previews."""
    num_classes = model.cond.num_classes
    if num_classes:
        labels = torch.arange(num) % num_classes
        return {"cls": labels.tolist()}, labels
    if real is not None and real.get("txt") and any(real["txt"]):
        if len(real["txt"]) < num:
            raise ValueError(f"{len(real['txt'])} held-out captions for {num} samples")
        labels = known_labels(real)
        return {"txt": list(real["txt"][:num])}, None if labels is None else labels[:num]
    return model.cond.preview(num), None


def concat(parts: list[Any]) -> Any:
    """Join per-batch outputs of `generate`: tensors along dim 0; tuples (several streams) element-wise."""
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(concat(list(p)) for p in zip(*parts))
    return torch.cat(parts)


def generate_samples(model: Any, cond: dict[str, Any], num: int, steps: int | None = None,
                     cfg_scale: float | None = None, seed: int = 0, batch_size: int = 100,
                     progress: bool = True) -> Any:
    """`num` samples in batches (batch i uses noise seed `seed + i`), moved to the CPU."""
    parts = []
    starts = range(0, num, batch_size)
    for i, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not progress)):
        n = min(batch_size, num - start)
        part = {k: v[start : start + n] for k, v in cond.items()}
        x = model.generate(part, n, steps=steps, cfg_scale=cfg_scale, seed=seed + i)
        parts.append(x.cpu() if isinstance(x, Tensor) else type(x)(t.cpu() for t in x))
    return concat(parts)


def evaluate_generator(evaluator: Evaluator, model: Any, real: dict[str, Any], reference: Any, num: int,
                       steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                       batch_size: int = 100, progress: bool = True) -> dict[str, float]:
    """Generate `num` samples and score them against the held-out `reference` (eval mode, no grad)."""
    cond, labels = conditions_for(model, num, real)
    was_training = model.training
    model.eval()
    try:
        generated = generate_samples(model, cond, num, steps, cfg_scale, seed, batch_size, progress)
    finally:
        model.train(was_training)
    return evaluator.scores(generated, labels, reference)
