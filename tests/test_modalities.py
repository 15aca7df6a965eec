"""Every generator end to end through the CLI: synthetic shards -> fit a few steps -> sample ->
the written file decodes back to the expected shape / duration."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from app.__main__ import main
from models.backbone import MMDiTConfig
from models.conditioning import ClassLabel
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
    from tests.mp4 import read_mp4

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
    # other lengths than the trained default (the backbone is length-agnostic), and misuse in one line
    ckpt = str(tmp_path / "runs/m/checkpoints/last.ckpt")
    for option, frames_out in ((["--frames", "13"], 12), (["--seconds", "2"], 16)):  # tpatch 2: whole tubelets
        assert main(["sample", "--ckpt", ckpt, "--num", "1", "--out", str(tmp_path / "long"), "--steps", "1",
                     "--prefix", option[0][2:], *option]) == 0
        assert read_mp4(tmp_path / "long" / f"{option[0][2:]}-0000.mp4")[0].shape[0] == frames_out
    assert main(["sample", "--ckpt", ckpt, "--num", "1", "--out", str(tmp_path / "x"), "--prompt", "a dog"]) == 2
    assert main(["sample", "--ckpt", ckpt, "--num", "1", "--out", str(tmp_path / "x"), "--class", "9"]) == 2


def test_audio_fit_packs_mixed_durations_and_samples_wav(tmp_path: Path, synthetic_shards) -> None:
    import soundfile

    from datamodules.audio import AudioTransform
    from datamodules.shards import ShardDataModule
    from models.backbone import MMDiTConfig
    from models.generators import AudioFlow
    from models.tokens import tokenize

    shards = synthetic_shards("audio")
    module = ShardDataModule(str(shards / "*.tar"), batch_size=4, num_workers=0, transform=AudioTransform(max_seconds=1.5))
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch["x"], list) and len({len(x) for x in batch["x"]}) > 1  # mixed durations stay a list
    model = AudioFlow(conditioning=ClassLabel(4), backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1, rope_axes=1))
    (mel,) = model.latents(batch)
    assert all(z.shape[-1] % model.tokenizer.patch == 0 for z in mel)  # cropped to whole patches
    tokens = tokenize(model.tokenizer, mel)
    hop = model.codec.hop
    expected = [(len(x) // hop + 1) // 2 for x in batch["x"]]
    assert tokens.layout.is_packed and tokens.layout.stream_seqlens(0) == expected  # packed, not padded
    assert model.loss(batch).isfinite()

    out = fit_and_sample(tmp_path, "configs/audio/tiny.yaml", shards, "--data.batch_size", "4")
    wavs = sorted(out.glob("sample-*.wav"))
    assert len(wavs) == 2 and (out / "sample-spectrograms.png").is_file()
    wave, rate = soundfile.read(wavs[0])
    assert rate == 8000 and len(wave) == model.codec.samples(model.tokenizer.frames) and abs(wave).max() <= 1.0
    ckpt = str(tmp_path / "runs/m/checkpoints/last.ckpt")  # 3 s of audio, though the model trained on shorter clips
    assert main(["sample", "--ckpt", ckpt, "--num", "1", "--out", str(tmp_path / "long"), "--steps", "1", "--seconds", "3"]) == 0
    long, _ = soundfile.read(tmp_path / "long" / "sample-0000.wav")
    assert abs(len(long) / 8000 - 3) < 2 * 2 * model.codec.hop / 8000  # within a token of 3 s
    assert main(["sample", "--ckpt", ckpt, "--num", "1", "--out", str(tmp_path / "x"), "--frames", "8"]) == 2


def test_audio_evaluate_scores_a_tiny_model(tmp_path: Path, synthetic_shards) -> None:
    from app.evaluation.modalities import AudioEvaluator, evaluator_for
    from models.generators import AudioFlow

    assert evaluator_for(AudioFlow(conditioning=ClassLabel(4))) is AudioEvaluator
    shards = synthetic_shards("audio")
    ckpt = tmp_path / "runs" / "m" / "checkpoints" / "last.ckpt"
    fit_and_sample(tmp_path, "configs/audio/tiny.yaml", shards, "--data.batch_size", "4", steps=2)
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(shards / "*.tar"), "--num", "12", "--steps", "2",
                 "--json", str(result)]) == 0
    metrics = json.loads(result.read_text())["metrics"]
    assert set(metrics) == {"mel_fd", "timbre_accuracy", "pitch_in_scale", "voiced_clips", "real_timbre_accuracy",
                            "real_pitch_in_scale"}
    assert metrics["real_timbre_accuracy"] >= 0.8 and metrics["voiced_clips"] <= 0.5  # real notes vs 2 steps of noise


def test_shape_fit_on_latent_shards_and_samples_ply(tmp_path: Path, shape_latents) -> None:
    import shutil

    from datamodules.media.mesh import read_ply

    ckpt, latents = shape_latents
    ae = tmp_path / "ae.ckpt"
    shutil.copy(ckpt, ae)
    out = fit_and_sample(tmp_path, "configs/shape/tiny.yaml", latents, "--data.batch_size", "8",
                         "--model.init_args.codec.init_args.ckpt", str(ae),
                         "--model.init_args.codec.init_args.resolution", "16")
    ae.unlink()  # sampling needs the flow's checkpoint alone
    again = tmp_path / "again"
    assert main(["sample", "--ckpt", str(tmp_path / "runs/m/checkpoints/last.ckpt"), "--num", "2", "--steps", "2",
                 "--out", str(again)]) == 0
    assert len(list(again.glob("sample-*.ply"))) == 2
    meshes = sorted(out.glob("sample-*.ply"))
    assert len(meshes) == 2 and (out / "sample-grid.png").is_file()
    for mesh in meshes:
        vertices, faces = read_ply(mesh)
        assert vertices.ndim == 2 and vertices.shape[1] == 3 and faces.shape[1:] == (3,)
        assert len(faces) == 0 or (abs(vertices) <= 1.0 + 1e-5).all()  # the decoder's grid spans [-1, 1]^3
    state = torch.load(tmp_path / "runs/m/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert "codecs.0.ae.latent_scale" in state["state_dict"]  # the frozen decoder travels with the flow
    assert not any(k.startswith("codecs.") for k in state["ema_state_dict"])  # ... and is not trained
    result = tmp_path / "eval.json"  # held-out = training shards here: only the plumbing is checked
    assert main(["evaluate", "--ckpt", str(tmp_path / "runs/m/checkpoints/last.ckpt"), "--data", str(latents),
                 "--num", "10", "--steps", "2", "--untrained", "--json", str(result)]) == 0
    metrics = json.loads(result.read_text())["metrics"]
    assert {"coverage", "mmd", "fidelity", "class_acc", "real_acc", "empty"} <= set(metrics)


def test_audiovideo_fit_samples_mp4_with_sound_and_evaluates_sync(tmp_path: Path, synthetic_shards) -> None:
    from app.evaluation.modalities import SyncEvaluator, evaluator_for
    from app.sample import load_generator
    from tests.mp4 import read_mp4

    shards = synthetic_shards("audiovideo")
    out = fit_and_sample(tmp_path, "configs/audiovideo/tiny.yaml", shards, "--data.batch_size", "4")
    clips = sorted(out.glob("sample-*.mp4"))
    assert len(clips) == 2 and (out / "sample-grid.png").is_file()
    frames, audio, fps, rate = read_mp4(clips[0])
    assert frames.shape[0] == 8 and round(fps) == 8 and rate == 8000
    assert audio is not None and audio.shape[1] == 1 and len(audio) >= 7 * 1000  # about 1 s of sound: 8 frames at 8 fps

    ckpt = tmp_path / "runs" / "m" / "checkpoints" / "last.ckpt"
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(shards / "*.tar"), "--num", "10", "--steps", "2",
                 "--json", str(result)]) == 0
    metrics = json.loads(result.read_text())["metrics"]
    assert metrics["real_sync_offset_ms"] <= 6 and metrics["real_sync_f1"] == 1.0  # real clips: in sync
    assert metrics["sync_offset_ms"] >= 100  # 3 training steps, 2 ODE steps: out of sync
    assert evaluator_for(load_generator(ckpt)[0]) is SyncEvaluator


def test_audio_evaluator_scores_real_clips_as_perfect(synthetic_shards) -> None:
    """Known answer: the held-out clips scored as if generated give mel_fd ~0 and the real accuracies."""
    from app.evaluation.modalities import AudioEvaluator
    from datamodules.shards import read_samples
    from models.generators import AudioFlow

    shards = str(synthetic_shards("audio") / "*.tar")
    evaluator = AudioEvaluator(AudioFlow(conditioning=ClassLabel(4), backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1,
                                                              rope_axes=1)), shards, progress=False)
    real = read_samples(shards, evaluator.transform(), 24)
    reference = evaluator.reference(real)
    perfect = evaluator.scores(evaluator.as_generated(real), real["cls"], reference)
    assert abs(perfect["mel_fd"]) < 1e-6
    assert perfect["timbre_accuracy"] == perfect["real_timbre_accuracy"] == 1.0
    noise = [torch.randn_like(w).clamp(-1, 1) * 0.5 for w in real["x"]]
    assert evaluator.scores(noise, real["cls"], reference)["mel_fd"] > 10 * max(perfect["mel_fd"], 1e-3)


def test_video_evaluator_frame_fd_and_checker(synthetic_shards) -> None:
    """Known answers: real clips scored as generated give frame_fd ~0 and the checker's real scores;
    noise clips a large frame_fd and no valid frames. The feature net trains on the training frames."""
    from app.evaluation.modalities import VideoEvaluator, evaluator_for
    from datamodules.shards import read_samples
    from models.generators import VideoFlow
    from models.tokenizers.video import VideoPatches

    shards = str(synthetic_shards("video") / "*.tar")
    model = VideoFlow(tokenizer=VideoPatches(size=16, frames=8, patch=2, tpatch=2), conditioning=ClassLabel(4),
                      backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1, rope_axes=3))
    assert evaluator_for(model) is VideoEvaluator
    evaluator = VideoEvaluator(model, shards, progress=False, feature_steps=30)
    assert evaluator.net.meta["train_samples"] > 48  # frames, not clips
    real = read_samples(shards, evaluator.transform(), 24)
    reference = evaluator.reference(real)
    perfect = evaluator.scores(evaluator.as_generated(real), real["cls"], reference)
    assert abs(perfect["frame_fd"]) < 1e-6
    assert perfect["shape_accuracy"] == perfect["real_shape_accuracy"] >= 0.9
    assert perfect["cas"] == perfect["real_acc"] >= 0.5  # chance is 0.25
    noise = [torch.rand_like(c) * 2 - 1 for c in real["x"]]
    worst = evaluator.scores(noise, real["cls"], reference)
    assert worst["frame_fd"] > 1.0 and worst["valid_frames"] == 0.0


def test_video_evaluator_on_other_clips_has_no_shape_checker(synthetic_shards, tmp_path) -> None:
    """Clips that are not the procedural bouncing shapes (classes.json names other classes: real footage)
    are scored by the frame feature net alone (frame_fd, cas, real_acc): the shape checker would read
    nonsense from them."""
    import json
    import shutil

    from app.evaluation.modalities import VideoEvaluator
    from datamodules.shards import read_samples
    from models.generators import VideoFlow
    from models.tokenizers.video import VideoPatches

    src = synthetic_shards("video")
    for f in src.glob("*.tar"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "classes.json").write_text(json.dumps(["street", "car", "desk", "park"]))
    shards = str(tmp_path / "*.tar")
    model = VideoFlow(tokenizer=VideoPatches(size=16, frames=8, patch=2, tpatch=2), conditioning=ClassLabel(4),
                      backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1, rope_axes=3))
    evaluator = VideoEvaluator(model, shards, progress=False, feature_steps=30)
    real = read_samples(shards, evaluator.transform(), 24)
    scores = evaluator.scores(evaluator.as_generated(real), real["cls"], evaluator.reference(real))
    assert set(scores) == {"frame_fd", "cas", "real_acc"}
    assert scores["cas"] == scores["real_acc"]
