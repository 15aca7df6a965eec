"""Mixed image sizes and aspect ratios: kept whole (no crop), batched by a token budget, packed."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from app.__main__ import main
from datamodules.shards import ShardDataModule, budget_batched
from datamodules.synthetic import synthetic_mixed_images, write_synthetic
from datamodules.transforms import ImageTransform, collate
from tests.conftest import SMALL, TINY


def test_keep_aspect_resizes_without_cropping() -> None:
    t = ImageTransform(size=16, keep_aspect=True, multiple=2)
    for h, w in [(16, 16), (20, 40), (64, 24), (9, 13)]:  # the last is smaller than 16 x 16: kept at its size
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        x = t({"png": image, "__key__": "k"})["x"]
        _, oh, ow = x.shape
        assert oh % 2 == 0 and ow % 2 == 0
        assert abs(oh * ow - min(h * w, 256)) <= 0.3 * min(h * w, 256)  # at most about size^2 pixels
        assert abs(np.log((ow / oh) / (w / h))) < 0.25  # the aspect ratio is kept (up to rounding to the patch)
        assert t.cost({"x": x}) == (oh // 2) * (ow // 2)  # tokens at patch 2
    wide = t({"png": np.zeros((10, 100, 3), np.uint8), "__key__": "k"})["x"]
    assert wide.shape[2] / wide.shape[1] <= 4.0 + 0.5  # past max_aspect: capped


def test_collate_keeps_mixed_shapes_as_a_list() -> None:
    same = collate([{"x": torch.zeros(3, 4, 4)}, {"x": torch.ones(3, 4, 4)}])
    assert isinstance(same["x"], torch.Tensor) and same["x"].shape == (2, 3, 4, 4)
    mixed = collate([{"x": torch.zeros(3, 4, 4)}, {"x": torch.ones(3, 4, 8)}])
    assert isinstance(mixed["x"], list) and [tuple(x.shape) for x in mixed["x"]] == [(3, 4, 4), (3, 4, 8)]


def test_budget_batches_hold_every_sample_once_within_budget() -> None:
    costs = [5, 3, 9, 2, 2, 2, 20, 1, 4, 4, 4, 6]
    samples = [{"x": torch.zeros(c), "i": i} for i, c in enumerate(costs)]
    batches = list(budget_batched(iter(samples), batch_size=4, budget=10, cost=lambda s: s["x"].numel()))
    seen = [i for b in batches for i in b["i"].tolist()]
    assert seen == list(range(len(costs)))[: len(seen)] and len(seen) >= len(costs) - 4  # in order, no gaps
    for b in batches:
        total = sum(x.numel() for x in b["x"])
        assert len(b["i"]) <= 4 and (total <= 10 or len(b["i"]) == 1)  # an oversized sample rides alone
    assert any(len(b["i"]) == 1 and b["x"][0].numel() == 20 for b in batches)


def test_budget_batched_datamodule_packs_mixed_images(tmp_path: Path) -> None:
    write_synthetic("image-mixed", str(tmp_path), num=48, shard_size=16, image_size=16, progress=False)
    module = ShardDataModule(str(tmp_path / "*.tar"), batch_size=8, num_workers=0, batch_budget=200,
                             transform=ImageTransform(size=16, keep_aspect=True, multiple=2))
    batches = list(itertools.islice(iter(module.train_dataloader()), 6))
    shapes = {tuple(x.shape) for b in batches for x in b["x"]}
    assert len(shapes) > 3  # mixed sizes really reach the model
    for b in batches:
        tokens = sum((x.shape[1] // 2) * (x.shape[2] // 2) for x in b["x"])
        assert tokens <= 200 or len(b["x"]) == 1


def test_mixed_images_keep_the_shape_undistorted() -> None:
    s = next(synthetic_mixed_images(1, image_size=16, seed=3))
    h, w, _ = s["png"].shape
    assert max(h, w) / min(h, w) <= 2.0 and min(h, w) >= 8 and s["json"]["height"] == h


def test_fit_on_mixed_sizes_with_a_token_budget(tmp_path: Path) -> None:
    shards = tmp_path / "mixed"
    write_synthetic("image-mixed", str(shards), num=48, shard_size=16, image_size=16, progress=False)
    args = ["fit", "--config", TINY, *SMALL, "--runs_dir", str(tmp_path / "runs"), "--name", "mixed",
            "--data.train_shards", str(shards / "*.tar"), "--trainer.max_steps", "4",
            "--trainer.log_every_n_steps", "1",
            "--data.transform.init_args.keep_aspect", "true", "--data.transform.init_args.multiple", "2",
            "--data.batch_budget", "300", "--trainer.callbacks+=callbacks.throughput.Throughput",
            "--trainer.callbacks.window", "2"]
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "runs/mixed/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


def test_throughput_counts_packed_tokens_and_padding() -> None:
    from callbacks.throughput import Throughput
    from models.training import RunState

    class Module(RunState):
        last_lengths = [10, 4, 6]
        logged: dict = {}

        class backbone:  # noqa: N801 - stands in for MMDiT
            @staticmethod
            def flops_per_token(n: int) -> float:
                return 2.0 * n

        def log_dict(self, metrics: dict, batch_size: int) -> None:
            self.logged.update(metrics)

    cb, m = Throughput(window=2, peak_flops=1.0), Module()
    for _ in range(2):
        cb.on_train_batch_start(None, m, None, 0)
        cb.on_train_batch_end(None, m, None, None, 0)
    assert abs(m.logged["data/padding_fraction_if_padded"] - (1 - 20 / 30)) < 1e-9
    assert m.logged["perf/samples_per_s"] > 0 and m.logged["perf/mfu"] > 0
