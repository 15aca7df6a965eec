"""End to end on pretrained first stages and text encoders, per modality: media shards ->
`shards encode` (tiny random diffusers autoencoder + tiny T5) -> `fit` a few steps on the cached
latents with the shipped latent config -> `sample` -> the file decodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from app.__main__ import main
from tests.conftest import ROOT
from tests.mp4 import read_mp4

CASES = {
    # modality: (synthetic kind, autoencoder, encode options, model overrides)
    "image": ("image", "kl", ["--size", "16"], ["--model.init_args.tokenizer.size", "8"]),
    "video": ("video", "wan", ["--size", "16", "--max-frames", "8"],
              ["--model.init_args.tokenizer.size", "4", "--model.init_args.seconds", "null",
               "--model.init_args.tokenizer.frames", "2", "--model.init_args.fps", "8"]),
    "audio": ("audio", "oobleck", ["--max-seconds", "0.5"],
              ["--model.init_args.seconds", "null", "--model.init_args.tokenizer.frames", "32",
               "--model.init_args.tokenizer.patch", "4"]),
    "audiovideo": ("audiovideo", "wan", ["--size", "16", "--max-frames", "8", "--fps", "8"],
                   ["--model.init_args.tokenizer.size", "4", "--model.init_args.seconds", "null",
                    "--model.init_args.tokenizer.frames", "2",
                    "--model.init_args.fps", "8", "--model.init_args.audio_tokenizer.patch", "8"]),
}


@pytest.mark.parametrize("modality", sorted(CASES))
def test_media_to_latent_shards_to_training_to_samples(modality: str, pretrained, synthetic_shards, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    kind, autoencoder, encode_opts, model_opts = CASES[modality]
    latents = tmp_path / "latents"
    t5 = str(pretrained["t5"])
    pipeline = tmp_path / "pipeline"  # the shipped configs name a diffusers pipeline folder's vae/
    pipeline.mkdir()
    (pipeline / "vae").symlink_to(pretrained[autoencoder] / "vae" if autoencoder == "kl" else pretrained[autoencoder])
    audio = []  # audio-video: the soundtrack's autoencoder, in a pipeline folder of its own
    if modality == "audiovideo":
        (tmp_path / "sound" / "vae").parent.mkdir()
        (tmp_path / "sound" / "vae").symlink_to(pretrained["oobleck"])
        encode_opts = [*encode_opts, "--audio-autoencoder", str(tmp_path / "sound"), "--audio-subfolder", "vae"]
        audio = ["--model.init_args.audio_codec.init_args.path", str(tmp_path / "sound"),
                 "--model.init_args.audio_codec.init_args.stats", str(latents / "audio-latent-stats.json")]
    assert main(["shards", "encode", str(synthetic_shards(kind)), str(latents), "--autoencoder", str(pipeline),
                 "--subfolder", "vae", "--text-encoder", f"{t5},max_length=16", "--batch-size", "8", "--device", "cpu", *encode_opts]) == 0
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["samples"] > 0 and manifest["text_encoders"][0]["path"] == t5

    args = ["fit", "--config", str(ROOT / f"configs/{modality}/latent.yaml"), "--runs_dir", str(tmp_path / "runs"),
            "--name", "e2e", "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "4", "--data.num_workers", "0", "--data.train_shards", str(latents / "*.tar"),
            "--model.init_args.codec.init_args.path", str(pipeline),
            "--model.init_args.codec.init_args.dtype", "float32",
            "--model.init_args.codec.init_args.stats", str(latents / "latent-stats.json"),
            "--model.init_args.conditioning.init_args.encoders", json.dumps([{"path": t5, "max_length": 16}]),
            "--model.init_args.backbone.dim", "32", "--model.init_args.backbone.heads", "2",
            "--model.init_args.backbone.depth_dual", "1", "--model.init_args.backbone.depth_single", "1",
            "--model.init_args.sampler.init_args.steps", "2", *audio, *model_opts]
    assert main(args) == 0
    ckpt = tmp_path / "runs/e2e/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    codec_args = state["hyper_parameters"]["codec"]["init_args"]
    assert codec_args["fingerprint"] == manifest["autoencoder"]["fingerprint"] and codec_args["stats"] is None
    assert not any(k.startswith("codecs.0.") and "latent_" not in k for k in state["state_dict"])  # no VAE weights

    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--num", "2", "--out", str(out), "--prompt", "a red circle",
                 "--steps", "2"]) == 0
    if modality == "image":
        with Image.open(out / "sample-0000.png") as image:
            assert image.size == (16, 16)  # 8x8 latents through the factor-2 decoder
        # the autoencoder's folder changed, then gone: sample stops with one line naming it
        vae = pipeline / "vae"
        vae.unlink()
        shutil.copytree(pretrained[autoencoder] / "vae", vae)
        config = json.loads((vae / "config.json").read_text())
        (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 9.0}))
        for expected in ("changed: config differ", "does not exist"):
            assert main(["sample", "--ckpt", str(ckpt), "--num", "1", "--out", str(out), "--steps", "1"]) == 2
            err = capsys.readouterr().err
            assert expected in err and str(vae) in err and "Traceback" not in err
            assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
            shutil.rmtree(vae, ignore_errors=True)
    elif modality in ("video", "audiovideo"):
        frames, sound, fps, rate = read_mp4(next(out.glob("*.mp4")))
        assert frames.shape[:3] == (5, 128, 128)  # 2 latent frames: 1 + 4 frames of 16 px, written 8x larger
        if modality == "audiovideo":  # the decoded soundtrack, as long as the 5 frames at 8 fps
            assert rate == 8000 and sound is not None and abs(len(sound) / rate - 5 / 8) < 0.15
    else:
        wave, rate = soundfile.read(next(out.glob("*.wav")))
        assert rate == 8000 and len(wave) == 32 * 8 and np.isfinite(wave).all()  # 32 latent frames x hop 8


@pytest.mark.parametrize("mismatch", ["text encoders", "autoencoder", "fps"])
def test_latent_shards_made_with_other_models_or_rates_are_refused_in_one_line(
        mismatch: str, pretrained, latent_shards, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    modality = "audiovideo" if mismatch == "fps" else "image"
    pipeline, shards = latent_shards(modality)
    encoder = {"path": str(pretrained["t5"]), "max_length": 16}
    args = ["fit", "--config", str(ROOT / f"configs/{modality}/latent.yaml"), "--runs_dir", str(tmp_path / "runs"),
            "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--trainer.logger", "false", "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.train_shards", str(shards / "*.tar"), "--model.init_args.codec.init_args.path", str(pipeline),
            "--model.init_args.codec.init_args.dtype", "float32", "--model.init_args.backbone.dim", "32",
            "--model.init_args.backbone.heads", "2", "--model.init_args.backbone.depth_dual", "1",
            "--model.init_args.backbone.depth_single", "1"]
    if modality == "audiovideo":
        args += ["--model.init_args.audio_codec.init_args.path", str(pipeline / "sound"), "--model.init_args.fps", "16",
                 "--model.init_args.tokenizer.size", "4", "--model.init_args.seconds", "null",
                 "--model.init_args.tokenizer.frames", "2",
                 "--model.init_args.audio_tokenizer.patch", "8"]
    else:
        args += ["--model.init_args.tokenizer.size", "8"]
    if mismatch == "text encoders":
        encoder = {"path": str(pretrained["bert"])}
    if mismatch == "autoencoder":  # the same architecture, other weights: another autoencoder
        other = tmp_path / "other"
        shutil.copytree(pipeline / "vae", other / "vae")
        config = json.loads((other / "vae" / "config.json").read_text())
        (other / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 2.5}))
        args[args.index(str(pipeline))] = str(other)
    args += ["--model.init_args.conditioning.init_args.encoders", json.dumps([encoder]),
             "--model.init_args.codec.init_args.stats", str(shards / "latent-stats.json")]
    if modality == "audiovideo":
        args += ["--model.init_args.audio_codec.init_args.stats", str(shards / "audio-latent-stats.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    expected = {"text encoders": ("manifest.json", "text_encoders"), "fps": ("manifest.json", "fps=8"),
                # the statistics measured with the other autoencoder stop it first, the manifest would next
                "autoencoder": ("latent-stats.json", "was measured with autoencoder")}[mismatch]
    assert all(part in line[0] for part in expected), line[0]


def test_latents_through_the_shards_equal_latents_encoded_in_the_data_path(latent_shards, synthetic_shards) -> None:
    """The cache, read as training reads it (CachedLatents over `shards encode` output), gives the model the
    same latents as the autoencoder encoding the media in the training step (the transform following the model)."""
    from datamodules.latents import CachedLatents
    from datamodules.shards import read_samples
    from datamodules.transforms import ImageTransform
    from models.backbone import MMDiTConfig
    from models.codecs.pretrained import PretrainedAutoencoder
    from models.conditioning import ClassLabel
    from models.generators import ImageFlow
    from models.tokenizers.image import ImagePatches

    pipeline, latents = latent_shards("image")
    codec = PretrainedAutoencoder(str(pipeline), subfolder="vae", stats=str(latents / "latent-stats.json"))
    model = ImageFlow(tokenizer=ImagePatches(size=8, patch=2), codec=codec, conditioning=ClassLabel(4),
                      backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1))
    media, cached = ImageTransform(), CachedLatents()
    for transform in (media, cached):
        transform.follow(model.media_spec())
    live = read_samples(str(synthetic_shards("image")), media, 12)
    stored = read_samples(str(latents), cached, 12)
    assert live["__key__"] == stored["__key__"] and live["x"].shape == (12, 3, 16, 16)
    torch.testing.assert_close(model.latents(stored)[0], model.latents(live)[0], atol=1e-5, rtol=1e-5)
    assert model.latents(stored)[0].abs().mean() > 0.1  # normalised latents, not zeros


def test_a_causal_video_codec_keeps_1_plus_4m_frames_and_the_audio_of_the_same_span(pretrained, synthetic_shards) -> None:
    """Wan encodes the first frame alone, then 4 at a time: the data cuts clips to 1 + 4m frames (not 4m, which the
    codec would cut again), the model samples that many, and a soundtrack is cut to exactly those frames."""
    from datamodules.audiovideo import AudioVideoTransform
    from datamodules.shards import read_samples
    from models.backbone import MMDiTConfig
    from models.codecs.pretrained import PretrainedAutoencoder
    from models.conditioning import ClassLabel
    from models.generators import AudioVideoFlow
    from models.tokenizers.audio import AudioFrames
    from models.tokenizers.video import VideoPatches

    wan, oobleck = PretrainedAutoencoder(str(pretrained["wan"])), PretrainedAutoencoder(str(pretrained["oobleck"]))
    model = AudioVideoFlow(tokenizer=VideoPatches(frames=2, size=4, patch=2), audio_tokenizer=AudioFrames(patch=8),
                           codec=wan, audio_codec=oobleck, fps=8, conditioning=ClassLabel(4),
                           backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1))
    spec = model.media_spec()
    assert spec.frames == 5 and spec.time.causal and spec.time.keep(8) == 5 and spec.time.keep(9) == 9
    transform = AudioVideoTransform()
    transform.follow(spec)
    batch = read_samples(str(synthetic_shards("audiovideo")), transform, 6)  # clips of 4 to 12 frames
    for clip, wave in zip(batch["x"], batch["audio"]):
        t = clip.shape[1]
        assert (t - 1) % 4 == 0 and wan.encode_raw(clip[None]).shape[2] == 1 + (t - 1) // 4  # nothing cut again
        assert len(wave) == round(t * 8000 / 8)  # the soundtrack of exactly the kept frames
    assert model.tokenizers[1].frames == round(5 * 8000 / 8 / 8 / 8) * 8  # audio latent frames as long as 5 frames
    assert torch.isfinite(model.loss(batch))
