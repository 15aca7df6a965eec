"""Evaluation end to end: feature net, `duoflow evaluate`, the in-loop callback, `datasets digits`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from app.__main__ import main
from app.evaluation.feature_net import feature_net_for, load_feature_net, read_images
from app.evaluation.metrics import accuracy
from app.evaluation.modalities import ImageEvaluator
from app.evaluation.run import conditions_for
from app.sample import load_generator
from datamodules.shards import read_samples
from datamodules.synthetic import write_synthetic
from tests.conftest import SMALL, TINY

FEATURE_STEPS, FEATURE_WIDTH = 40, 8  # a small net: seconds on 2 CPU cores


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic shapes (4 classes, 16 px): a training split and a held-out split drawn with another seed."""
    root = tmp_path_factory.mktemp("eval-data")
    write_synthetic("image", str(root / "train"), num=96, shard_size=32, seed=0, image_size=16, progress=False)
    write_synthetic("image", str(root / "test"), num=48, shard_size=48, seed=1, image_size=16, progress=False)
    return root / "train", root / "test"


@pytest.fixture(scope="module")
def feature_net_file(splits: tuple[Path, Path]) -> Path:
    train, _ = splits
    path = train.parent / "small-feature-net.pt"
    feature_net_for(str(train), 4, 16, steps=FEATURE_STEPS, width=FEATURE_WIDTH, path=path, progress=False)
    return path


@pytest.fixture(scope="module")
def run(splits: tuple[Path, Path], feature_net_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny run with the Evaluation callback at step 2, logging to CSV."""
    train, test = splits
    runs = tmp_path_factory.mktemp("eval-runs")
    assert main(["fit", "--config", TINY, *SMALL, "--runs_dir", str(runs), "--name", "e",
                 "--data.train_shards", str(train / "*.tar"), "--trainer.max_steps", "2",
                 "--trainer.log_every_n_steps", "1",
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(runs / "csv"),
                 "--trainer.callbacks+=app.evaluation.callback.Evaluation", "--trainer.callbacks.every_n_steps", "2",
                 "--trainer.callbacks.num", "20", "--trainer.callbacks.data", str(test),
                 "--trainer.callbacks.steps", "2", "--trainer.callbacks.feature_net", str(feature_net_file)]) == 0
    return runs


def test_feature_net_beats_chance_on_held_out_images(splits: tuple[Path, Path], feature_net_file: Path) -> None:
    net = load_feature_net(feature_net_file)
    assert net.meta["train_samples"] == 96 and net.meta["width"] == FEATURE_WIDTH
    x, labels = read_images(str(splits[1]), 16)
    features, logits = net.embed(x)
    assert features.shape == (48, 4 * FEATURE_WIDTH)
    assert accuracy(logits, labels) > 0.5  # 4 classes: chance is 0.25


def test_feature_net_is_cached_next_to_the_shards(tmp_path: Path, splits: tuple[Path, Path]) -> None:
    train = tmp_path / "train"
    write_synthetic("image", str(train), num=24, seed=0, image_size=8, progress=False)
    first = feature_net_for(str(train), 4, 8, steps=2, width=4, progress=False)
    assert (train / "feature-net.pt").is_file()
    again = feature_net_for(str(train), 4, 8, steps=2, width=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    retrained = feature_net_for(str(train), 4, 8, steps=3, width=4, progress=False)  # other steps: a new net
    assert retrained.meta["steps"] == 3 and load_feature_net(train / "feature-net.pt").meta["steps"] == 3


def test_callback_logs_eval_metrics(run: Path) -> None:
    (metrics_file,) = (run / "csv").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("eval/fid")]
    assert len(rows) == 1 and rows[0]["step"] == "2"
    assert {"eval/fid", "eval/precision", "eval/recall", "eval/cas", "eval/real_acc"} <= set(rows[0])
    assert 0.0 <= float(rows[0]["eval/cas"]) <= 1.0 and float(rows[0]["eval/fid"]) >= 0.0


def test_evaluate_cli_writes_json(run: Path, splits: tuple[Path, Path], feature_net_file: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    ckpt = run / "e" / "checkpoints" / "last.ckpt"
    common = ["evaluate", "--ckpt", str(ckpt), "--data", str(splits[1]), "--num", "20", "--steps", "2",
              "--batch-size", "8", "--feature-net", str(feature_net_file)]
    out = run / "eval.json"
    assert main([*common, "--real-reference", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    keys = {"fid", "precision", "recall", "cas", "real_acc"}
    assert set(result["metrics"]) == keys and set(result["real_reference"]) == keys
    assert result["num"] == 20 and result["weights"] == "ema" and result["step"] == 2
    assert result["train_shards"] == str(splits[0] / "*.tar")  # the training shards recorded in the checkpoint
    assert result["feature_net"]["width"] == FEATURE_WIDTH
    assert result["real_reference"]["fid"] < result["metrics"]["fid"]  # 2 training steps are far from the data
    assert "fid" in capsys.readouterr().out

    assert main([*common, "--untrained", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["weights"] == "untrained"

    assert main(["evaluate", "--ckpt", str(run / "missing.ckpt"), "--data", str(splits[1])]) == 2
    assert "--ckpt" in capsys.readouterr().err


def test_perfect_generator_gets_the_classifiers_real_accuracy(run: Path, splits: tuple[Path, Path],
                                                               feature_net_file: Path) -> None:
    """Real held-out images in place of generated ones, through the evaluator: CAS = the net's test accuracy."""
    model, _ = load_generator(run / "e" / "checkpoints" / "last.ckpt")
    evaluator = ImageEvaluator(model, str(splits[0]), feature_net=str(feature_net_file), progress=False)
    real = read_samples(str(splits[1]), evaluator.transform(), 48)
    scores = evaluator.scores(evaluator.as_generated(real), real["cls"], evaluator.reference(real))
    x, labels = read_images(str(splits[1]), 16)
    test_accuracy = accuracy(load_feature_net(feature_net_file).embed(x)[1], labels)
    assert scores["cas"] == scores["real_acc"] == test_accuracy
    assert scores["fid"] == pytest.approx(0.0, abs=1e-6)
    assert scores["precision"] == scores["recall"] == 1.0


def test_conditions_are_class_balanced(run: Path) -> None:
    model, _ = load_generator(run / "e" / "checkpoints" / "last.ckpt")
    cond, labels = conditions_for(model, 10)
    assert cond["cls"] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and labels.tolist() == cond["cls"]


def test_datasets_digits_split(tmp_path: Path) -> None:
    assert main(["datasets", "digits", str(tmp_path), "--size", "8"]) == 0
    train = sorted((tmp_path / "train").glob("*/*.png"))
    test = sorted((tmp_path / "test").glob("*/*.png"))
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=5)
    for split in ("train", "test"):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == [str(d) for d in range(10)]
    assert not {p.name for p in train} & {p.name for p in test}  # file name = row in load_digits: disjoint
