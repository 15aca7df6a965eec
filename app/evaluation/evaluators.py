"""Per-modality quality metrics: an `Evaluator` compares generated media with held-out real samples.

A new modality plugs in with an Evaluator subclass and one EVALUATORS entry. Three levels:
- embedding metrics: subclass `FeatureEvaluator`, implement `transform()` (how real samples are
  read) and `embed(media) -> (features (N, D), logits (N, K) or None)`; Fréchet distance
  (named by `fd_name`), precision/recall and CAS come for free (images);
- procedural checkers: subclass `CheckerEvaluator`, implement `check(media, labels)` with a
  checker from app/evaluation/checkers/ (video, audio, audio-video sync); `real_` ceilings come for free;
- anything else: subclass `Evaluator`, implement `transform()`, `reference(held_out)` (what is
  computed once per real set) and `scores(generated, labels, reference) -> {metric: float}` (3D).
`duoflow evaluate` (app/evaluate.py) and the in-loop callback (app/evaluation/callback.py) run them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from app.errors import UserError
from app.evaluation.feature_net import feature_net_for
from app.evaluation.metrics import accuracy, frechet_from_features, knn_precision_recall
from datamodules.shardlists import shard_classes
from datamodules.shards import expand_shards
from datamodules.transforms import SampleTransform
from datamodules.writers import CLASSES_NAME

T = TypeVar("T", bound=SampleTransform)


class Evaluator:
    """The metrics of one modality: compares generated media with held-out real samples.

    Built once per (generator, training split); `reference` runs once per real set, `scores`
    once per generated set. Subclasses must not train on or peek at the held-out samples."""

    descriptions: ClassVar[dict[str, str]] = {}
    """metric -> one-line meaning, printed beside the table."""

    def __init__(self, model: Any, train_shards: str | list[str], device: str | torch.device = "cpu",
                 seed: int = 0, progress: bool = True, feature_steps: int = 300, feature_net: str | None = None):
        """
        Args:
            model: The generator (its tokenizer/conditioning say what it makes).
            train_shards: The real training split, for anything the metrics must learn (never held-out data).
            device: Where metric networks run.
            seed: Seed of anything trained or drawn for the metrics.
            progress: Show progress bars.
            feature_steps: Training steps of a network the evaluator trains on the training split.
            feature_net: File of that network (default: next to the training shards); unused by others.
        """
        self.model, self.train_shards = model, train_shards
        self.device, self.seed, self.progress = torch.device(device), seed, progress
        self.feature_steps, self.feature_net = feature_steps, feature_net

    def transform(self) -> SampleTransform:
        """How real samples are read from shards, matching the generator's output media."""
        raise NotImplementedError

    def following_model(self, transform: T) -> T:
        """``transform`` with the options it leaves unset taken from the generator, as in training
        (``ShardDataModule.setup``): the generator's sizes, multiples and rates."""
        transform.follow(self.model.media_spec())
        return transform

    def as_generated(self, held_out: dict[str, Any]) -> Any:
        """Real samples in the form `generate` returns (for the real reference and the perfect-generator check)."""
        return held_out["x"]

    def reference(self, held_out: dict[str, Any]) -> Any:
        """What the scores need from the real held-out set, computed once (default: the samples)."""
        return held_out

    def scores(self, generated: Any, labels: Tensor | None, reference: Any) -> dict[str, float]:
        """Metrics of generated media (labels: the class each was conditioned on, or None)."""
        raise NotImplementedError

    net: Any = None
    """The feature net of evaluators that embed media (train_feature_net), else None."""

    def info(self) -> dict[str, Any]:
        """What the metrics depend on besides the samples (recorded in the JSON): the feature net's provenance."""
        if self.net is None:
            return {}
        keep = ("num_classes", "width", "size", "steps", "seed", "train_samples", "train_accuracy")
        return {"feature_net": {k: self.net.meta.get(k) for k in keep}}

    def train_feature_net(self, transform: SampleTransform | None = None) -> Any:
        """The FeatureNet of the training split at the generator's size (trained once, then reused
        from its file), on the evaluator's device; `transform` reads the training samples."""

        return feature_net_for(self.train_shards, num_classes_of(self.train_shards, self.model),
                               int(self.model.media_spec().size), steps=self.feature_steps, seed=self.seed,
                               path=self.feature_net, device=self.device, progress=self.progress,
                               transform=transform).to(self.device)


class FeatureEvaluator(Evaluator):
    """Metrics in the embedding of a fixed network: Fréchet distance, k-NN precision/recall, and,
    when the network classifies, CAS (accuracy on generated samples labelled by their condition)
    beside the same network's accuracy on the real held-out samples (the ceiling of CAS)."""

    fd_name: ClassVar[str] = "fd"
    k: ClassVar[int] = 3
    """Neighbours for the precision/recall manifolds (Kynkäänniemi et al. use 3)."""

    def embed(self, media: Any) -> tuple[Tensor, Tensor | None]:
        """(features (N, D), class logits (N, K) or None) of real or generated media."""
        raise NotImplementedError

    def reference(self, held_out: dict[str, Any]) -> dict[str, Any]:
        features, logits = self.embed(self.as_generated(held_out))
        return {"features": features, "logits": logits, "labels": known_labels(held_out)}

    def scores(self, generated: Any, labels: Tensor | None, reference: dict[str, Any]) -> dict[str, float]:
        features, logits = self.embed(generated)
        out = {self.fd_name: frechet_from_features(reference["features"], features),
               **knn_precision_recall(reference["features"], features, k=self.k)}
        if logits is not None and labels is not None:
            out["cas"] = accuracy(logits, labels)
        if reference["logits"] is not None and reference["labels"] is not None:
            out["real_acc"] = accuracy(reference["logits"], reference["labels"])
        return out


class CheckerEvaluator(Evaluator):
    """Metrics a procedural checker reads back from the media (app/evaluation/checkers/), nothing trained. The
    held-out real samples scored the same way give the `real_` columns (the ceiling)."""

    labelled: ClassVar[tuple[str, ...]] = ()
    """Metrics that compare with the conditioning class (dropped when the samples have none)."""
    ceiling: ClassVar[tuple[str, ...]] = ()
    """Metrics also reported for the real held-out samples, as real_<name> (the ceiling)."""

    def check(self, media: Any, labels: list[int]) -> dict[str, float]:
        """The checker's scores of generated-form media; labels are zeros when unknown."""
        raise NotImplementedError

    def checked(self, media: Any, labels: Tensor | None) -> dict[str, float]:
        n = len(media[0]) if isinstance(media, tuple) else len(media)
        scores = self.check(media, [0] * n if labels is None else labels.tolist())
        return scores if labels is not None else {k: v for k, v in scores.items() if k not in self.labelled}

    def reference(self, held_out: dict[str, Any]) -> dict[str, float]:
        scores = self.checked(self.as_generated(held_out), known_labels(held_out))
        return {f"real_{k}": v for k, v in scores.items() if k in self.ceiling}

    def scores(self, generated: Any, labels: Tensor | None, reference: dict[str, float]) -> dict[str, float]:
        return {**self.checked(generated, labels), **reference}


def class_names_of(train_shards: str | list[str]) -> list[str] | None:
    """The class names in classes.json next to the training shards (written by `duoflow shards`), or None."""
    return shard_classes(expand_shards(train_shards))


def num_classes_of(train_shards: str | list[str], model: Any) -> int:
    """From classes.json next to the training shards (written by `duoflow shards`), else the model's."""
    urls = expand_shards(train_shards)
    names = shard_classes(urls)
    if names is not None:
        return len(names)
    n = model.cond.num_classes
    if n is None:
        raise UserError(f"{Path(urls[0]).parent / CLASSES_NAME}: not found, and the model is not class-conditional; "
                        "the feature net needs the class names of the training shards (written by `duoflow shards`)")
    return int(n)


def known_labels(samples: dict[str, Any]) -> Tensor | None:
    """The samples' class ids, or None when any is unknown (-1: its shard had no cls field)."""
    labels = samples.get("cls")
    return labels if isinstance(labels, Tensor) and bool((labels >= 0).all()) else None
