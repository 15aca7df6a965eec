"""Every generator end to end through the CLI: synthetic shards -> fit a few steps -> sample ->
the written file decodes back to the expected shape / duration."""

from __future__ import annotations

from pathlib import Path

import torch

from app.__main__ import main
from tests.conftest import ROOT

SHRINK = ["--model.init_args.backbone.dim", "32", "--model.init_args.backbone.heads", "2",
          "--model.init_args.backbone.depth_dual", "1", "--model.init_args.backbone.depth_single", "1",
          "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def fit_and_sample(tmp_path: Path, config: str, shards: Path, *extra: str, steps: int = 3) -> Path:
    run = tmp_path / "runs" / "m"
    assert main(["fit", "--config", str(ROOT / config), *SHRINK, "--runs_dir", str(tmp_path / "runs"), "--name", "m",
                 "--data.train_shards", str(shards / "*.tar"), "--trainer.max_steps", str(steps), *extra]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == steps
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--num", "2", "--out", str(out), "--steps", "2"]) == 0
    return out


def test_video_fit_packs_mixed_lengths_and_samples_mp4(tmp_path: Path, synthetic_shards) -> None:
    from datamodules.shards import ShardDataModule
    from datamodules.video import VideoTransform
    from models.media import read_mp4

    shards = synthetic_shards("video")
    module = ShardDataModule(str(shards / "*.tar"), batch_size=4, num_workers=0,
                             transform=VideoTransform(size=16, max_frames=8, frame_multiple=2))
    batches = [b for b, _ in zip(module.train_dataloader(), range(4))]
    assert any(isinstance(b["x"], list) and len({x.shape[1] for x in b["x"]}) > 1 for b in batches)  # mixed: packed

    out = fit_and_sample(tmp_path, "configs/video/tiny.yaml", shards, "--data.batch_size", "4")
    clips = sorted(out.glob("sample-*.mp4"))
    assert len(clips) == 2 and (out / "sample-grid.png").is_file()
    frames, audio, fps, _ = read_mp4(clips[0])
    assert frames.shape[0] == 8 and frames.shape[1] == frames.shape[2] and audio is None and round(fps) == 8
