"""Each value stated once: the generator derives its backbone's streams and RoPE axes, the data transform
follows the model's sizes, multiples and rates, batch budgets count tokens, and a stated value that
contradicts the derived one is one error line naming both config keys."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app.__main__ import main
from datamodules.audio import AudioTransform
from datamodules.audiovideo import AudioVideoTransform
from datamodules.media.spec import MediaSpec
from datamodules.shapes import LatentTransform
from datamodules.shards import ShardDataModule
from datamodules.transforms import ImageTransform
from datamodules.video import VideoTransform
from models.backbone import MMDiTConfig
from models.codecs.mel import MelCodec
from models.conditioning import ClassLabel
from models.generators import AudioFlow, AudioVideoFlow, FlowMatchingModule, ImageFlow, VideoFlow
from models.tokenizers.audio import AudioFrames
from models.tokenizers.image import ImagePatches
from models.tokenizers.video import VideoPatches
from tests.conftest import SMALL, TINY

TINY_BACKBONE = MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1)


def one_line_error(build, *words: str) -> str:
    """The ValueError ``build()`` raises: one line, holding every word."""
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def image(size: int = 16, patch: int = 2) -> ImageFlow:
    return ImageFlow(tokenizer=ImagePatches(size=size, patch=patch), conditioning=ClassLabel(4), backbone=TINY_BACKBONE)


def video(tpatch: int = 2) -> VideoFlow:
    return VideoFlow(tokenizer=VideoPatches(frames=8, size=16, patch=2, tpatch=tpatch), conditioning=ClassLabel(4),
                     backbone=TINY_BACKBONE, fps=6)


def audio(**kw) -> AudioFlow:
    return AudioFlow(conditioning=ClassLabel(4), backbone=TINY_BACKBONE, **kw)


def audiovideo(**kw) -> AudioVideoFlow:
    return AudioVideoFlow(**{"tokenizer": VideoPatches(frames=8, size=16, patch=2, tpatch=2), "backbone": TINY_BACKBONE,
                            "conditioning": ClassLabel(4),
                             "audio_codec": MelCodec(hop=125), "fps": 8, "sample_rate": 8000, **kw})


def model_tokens(model: FlowMatchingModule, sample: dict) -> int:
    """Tokens the model makes of one transformed sample, summed over its generated streams."""
    return sum(tok.tokenize(tok.crop(codec.encode(sample[key][None])))[0].shape[1]
               for key, tok, codec in zip(model.keys, model.tokenizers, model.codecs))


# ---------------------------------------------------------------- the backbone follows the generator


@pytest.mark.parametrize("build,streams,out_streams,rope_axes", [
    (image, 2, 1, 2), (video, 2, 1, 3), (audio, 2, 1, 1), (audiovideo, 3, 2, 3),
])
def test_generators_derive_streams_and_rope_axes(build, streams: int, out_streams: int, rope_axes: int) -> None:
    cfg = build().backbone_cfg
    assert (cfg.streams, cfg.out_streams, cfg.rope_axes) == (streams, out_streams, rope_axes)


def test_a_set_generator_takes_any_valid_rope_axes(shape_latents) -> None:
    from models.codecs.shape import ShapeLatents
    from models.generators import ShapeFlow

    ckpt, _ = shape_latents
    for stated, kept in ((None, 1), (3, 3)):  # a set has no positions: no axes to derive
        model = ShapeFlow(codec=ShapeLatents(str(ckpt), resolution=8), conditioning=ClassLabel(5),
                          backbone=MMDiTConfig(dim=32, heads=2, rope_axes=stated))
        assert (model.backbone_cfg.streams, model.backbone_cfg.out_streams, model.backbone_cfg.rope_axes) == (2, 1, kept)


def test_stated_backbone_values_are_accepted_when_they_agree_and_refused_in_one_line() -> None:
    AudioVideoFlow(tokenizer=VideoPatches(frames=8, size=16), conditioning=ClassLabel(4),
                   backbone=MMDiTConfig(dim=32, heads=2, streams=3, out_streams=2, rope_axes=3))
    one_line_error(lambda: ImageFlow(backbone=MMDiTConfig(dim=32, heads=2, rope_axes=3)),
                   "model.backbone.rope_axes=3", "ImageFlow", "= 2")
    one_line_error(lambda: AudioVideoFlow(backbone=MMDiTConfig(dim=32, heads=2, streams=2)),
                   "model.backbone.streams=2", "AudioVideoFlow's 2 generated streams + the context = 3")
    one_line_error(lambda: VideoFlow(backbone=MMDiTConfig(dim=32, heads=2, out_streams=2)), "model.backbone.out_streams=2")


# ---------------------------------------------------------------- audio values follow the model


def test_the_mel_codec_and_audio_tokenizer_follow_the_model() -> None:
    model = audio(sample_rate=16000, codec=MelCodec(n_mels=24, hop=160))
    assert model.codec.sample_rate == 16000 and model.sample_rate == 16000
    assert model.tokenizer.channels == 24 and model.tokenizer.frames == AudioFrames.default_frames
    assert audio(codec=MelCodec(sample_rate=8000)).codec.sample_rate == 8000  # stated and equal: accepted
    one_line_error(lambda: audio(sample_rate=16000, codec=MelCodec(sample_rate=8000)),
                   "model.codec.sample_rate=8000", "model.sample_rate", "16000")
    one_line_error(lambda: audio(tokenizer=AudioFrames(channels=40), codec=MelCodec(n_mels=24)),
                   "model.tokenizer.channels=40", "model.codec.n_mels", "24")


def test_audiovideo_derives_the_audio_length_from_the_video() -> None:
    model = audiovideo()
    assert model.tokenizers[1].frames == 8 * 8000 // 8 // 125 and model.tokenizers[1].channels == model.codecs[1].n_mels
    assert audiovideo(audio_tokenizer=AudioFrames(frames=64)).tokenizers[1].frames == 64  # old configs stated it
    one_line_error(lambda: audiovideo(audio_tokenizer=AudioFrames(frames=32)), "model.audio_tokenizer.frames=32",
                   "model.tokenizer.frames=8")
    one_line_error(lambda: audiovideo(audio_codec=MelCodec(sample_rate=16000)), "model.audio_codec.sample_rate=16000")


def test_lengths_are_stated_in_seconds_and_frames_derived() -> None:
    """``model.seconds``: frames = seconds x rate through the codec, whole tokens; a stated frame count must agree."""
    model = audio(sample_rate=8000, seconds=1.0)  # 8000 samples, hop 128: 62 whole mel frames (+1 cut to patch 2)
    assert model.tokenizer.frames == 62 and model.codec.samples(62) <= 8000
    assert audio(sample_rate=16000, seconds=5.0, codec=MelCodec(hop=160, n_fft=1024)).tokenizer.frames == 500
    assert audio(sample_rate=8000, seconds=1.0, tokenizer=AudioFrames(frames=62)).tokenizer.frames == 62  # agrees
    one_line_error(lambda: audio(sample_rate=8000, seconds=1.0, tokenizer=AudioFrames(frames=64)),
                   "model.tokenizer.frames=64", "model.seconds=1.0", "8000 samples at 8000 Hz", "62")
    clip = VideoFlow(tokenizer=VideoPatches(size=16, patch=2, tpatch=2), conditioning=ClassLabel(4),
                     backbone=TINY_BACKBONE, fps=12, seconds=1.34)
    assert clip.tokenizer.frames == 16 and clip.media_spec().frames == 16  # round(16.08), the data's longest clip too
    one_line_error(lambda: VideoFlow(tokenizer=VideoPatches(frames=8, size=16, tpatch=2), conditioning=ClassLabel(4),
                                     backbone=TINY_BACKBONE, fps=12, seconds=1.34),
                   "model.tokenizer.frames=8", "model.seconds=1.34", "16 frames at 12 fps")
    one_line_error(lambda: VideoFlow(tokenizer=VideoPatches(size=16, tpatch=2), conditioning=ClassLabel(4),
                                     backbone=TINY_BACKBONE, fps=8, seconds=0.1), "model.seconds=0.1", "no whole token")
    both = audiovideo(tokenizer=VideoPatches(size=16, patch=2, tpatch=2), seconds=0.5)  # 4 frames at 8 fps
    assert both.tokenizer.frames == 4 and both.tokenizers[1].frames == 4 * 8000 // 8 // 125


def test_sample_lengths_follow_the_models_seconds_rule() -> None:
    """``duoflow sample --frames/--seconds`` samples the latent lengths a model built with those seconds has (one
    rule: models.generators.whole_latent); a video's soundtrack lasts as long as the frames kept."""
    from app.errors import UserError
    from app.sample import latent_shapes

    clip = video()  # 6 fps, tpatch 2
    assert latent_shapes(clip, 13, None)[0][1] == 12  # whole tubelets
    for seconds in (1.34, 2.0):
        made = VideoFlow(tokenizer=VideoPatches(size=16, patch=2, tpatch=2), conditioning=ClassLabel(4),
                         backbone=TINY_BACKBONE, fps=6, seconds=seconds)
        assert latent_shapes(clip, None, seconds)[0][1] == made.tokenizer.frames
    assert latent_shapes(audio(sample_rate=8000), None, 1.0)[0][1] == audio(sample_rate=8000, seconds=1.0).tokenizer.frames
    shapes = latent_shapes(audiovideo(), 4, None)  # 4 frames at 8 fps: 0.5 s of sound
    assert shapes[0][1] == 4 and shapes[1][1] == audiovideo(tokenizer=VideoPatches(size=16, patch=2, tpatch=2), seconds=0.5).tokenizers[1].frames
    for frames, seconds, words in ((1, None, "--frames 1: 1 frames make no whole token (2 frames each)"),
                                   (None, 0.01, "--seconds 0.01: 0 frames make no whole token")):
        with pytest.raises(UserError, match=re.escape(words)) as info:
            latent_shapes(clip, frames, seconds)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the data transform follows the model


def test_image_transform_follows_the_model_size_and_multiple() -> None:
    model = image(size=24, patch=4)
    t = ImageTransform(keep_aspect=True)
    t.follow(model.media_spec())
    assert (t.size, t.multiple) == (24, 4)
    for ok in (ImageTransform(size=24, keep_aspect=True), ImageTransform(multiple=8, keep_aspect=True),
               ImageTransform(multiple=1)):  # without keep_aspect the multiple is unused (older configs state 1)
        ok.follow(model.media_spec())
    one_line_error(lambda: ImageTransform(size=32).follow(model.media_spec()),
                   "data.transform.size=32", "model.tokenizer.size", "24")
    one_line_error(lambda: ImageTransform(multiple=6, keep_aspect=True).follow(model.media_spec()),
                   "data.transform.multiple=6", "model.tokenizer.patch", "4")
    alone = ImageTransform()
    assert (alone.size, alone.multiple) == (32, 1)  # a transform alone keeps its defaults


def test_video_transform_follows_the_model_frames_and_frame_multiple() -> None:
    t = VideoTransform()
    t.follow(video(tpatch=4).media_spec())
    assert (t.size, t.frame_multiple, t.max_frames) == (16, 4, 8)
    longer = VideoTransform(max_frames=32)  # training clips may be longer than sampled ones
    longer.follow(video(tpatch=4).media_spec())
    assert longer.max_frames == 32
    one_line_error(lambda: VideoTransform(frame_multiple=2).follow(video(tpatch=4).media_spec()),
                   "data.transform.frame_multiple=2", "model.tokenizer.tpatch", "4")


def test_audio_transforms_follow_the_model_rates() -> None:
    t = AudioTransform()
    t.follow(audio(sample_rate=16000).media_spec())
    assert t.sample_rate == 16000 and AudioTransform().sample_rate == 8000
    one_line_error(lambda: AudioTransform(sample_rate=8000).follow(audio(sample_rate=16000).media_spec()),
                   "data.transform.sample_rate=8000", "model.sample_rate", "16000")
    av = AudioVideoTransform()
    av.follow(AudioVideoFlow(tokenizer=VideoPatches(frames=4, size=8, patch=2, tpatch=2), audio_codec=MelCodec(hop=125),
                              conditioning=ClassLabel(4),
                             backbone=TINY_BACKBONE, fps=4, sample_rate=4000).media_spec())
    assert (av.size, av.video.frame_multiple, av.video.max_frames, av.fps, av.sample_rate) == (8, 2, 4, 4, 4000)
    assert av.audio.max_seconds == 1.0  # the audio of the 4 frames kept
    one_line_error(lambda: AudioVideoTransform(fps=6).follow(audiovideo().media_spec()),
                   "data.transform.fps=6", "model.fps", "8")


def test_the_datamodule_hands_the_model_spec_to_its_transform() -> None:
    data = ShardDataModule("unused-*.tar", transform=VideoTransform())
    data.trainer = SimpleNamespace(lightning_module=video(tpatch=4))
    data.setup("fit")
    assert (data.transform.frame_multiple, data.transform.max_frames) == (4, 8)
    data.trainer = SimpleNamespace(lightning_module=torch.nn.Module())  # a module without a spec: left alone
    data.setup("fit")
    assert data.transform.frame_multiple == 4


# ---------------------------------------------------------------- batch_budget counts tokens


def test_cost_is_the_model_token_count_for_every_modality() -> None:
    rng = np.random.default_rng(0)
    m = image(size=16, patch=2)
    t = ImageTransform(keep_aspect=True)
    t.follow(m.media_spec())
    x = t({"png": rng.integers(0, 255, (12, 20, 3), dtype=np.uint8), "__key__": "k"})
    assert x["x"].shape[1:] == (12, 20) and t.cost(x) == 6 * 10 == model_tokens(m, x)

    m = video(tpatch=2)
    t = VideoTransform()
    t.follow(m.media_spec())
    x = t({"npy": rng.integers(0, 255, (7, 16, 16, 3), dtype=np.uint8), "__key__": "k"})  # 7 frames: 6 kept
    assert t.cost(x) == 3 * 8 * 8 == model_tokens(m, x)

    m = audio()  # hop 128, 2 frames per token, centred STFT: S // 128 + 1 frames
    t = AudioTransform()
    t.follow(m.media_spec())
    x = t({"wav": (rng.uniform(-0.5, 0.5, (8000, 1)).astype(np.float32), 8000), "__key__": "k"})
    assert t.cost(x) == (8000 // 128 + 1) // 2 == 31 == model_tokens(m, x)

    m = audiovideo()  # 6 frames at 8 fps: 3 x 8 x 8 video tokens + (6000 // 125 + 1) // 2 audio tokens
    t = AudioVideoTransform()
    t.follow(m.media_spec())
    decoded = {"npy": rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), "__key__": "k",
               "wav": (rng.uniform(-0.5, 0.5, (6000, 1)).astype(np.float32), 8000)}
    x = t(decoded)
    assert t.cost(x) == 3 * 8 * 8 + (6000 // 125 + 1) // 2 == 216 == model_tokens(m, x)

    t = LatentTransform()  # a shape is a set of K latent tokens
    t.follow(MediaSpec())
    assert t.cost({"x": torch.zeros(16, 4)}) == 16


def test_budget_batches_of_clips_stay_within_the_token_budget(synthetic_shards) -> None:
    model = video(tpatch=2)
    data = ShardDataModule(str(synthetic_shards("video") / "*.tar"), batch_size=8, num_workers=0, batch_budget=600,
                           transform=VideoTransform())
    data.trainer = SimpleNamespace(lightning_module=model)
    data.setup("fit")
    for batch in itertools.islice(iter(data.train_dataloader()), 5):
        clips = batch["x"] if isinstance(batch["x"], list) else list(batch["x"])
        tokens = sum(model_tokens(model, {"x": c}) for c in clips)
        assert tokens <= 600 or len(clips) == 1


# ---------------------------------------------------------------- configs of older runs state everything


def test_old_style_duplicated_values_are_accepted_when_they_agree(tmp_path: Path, image_shards: Path) -> None:
    """Checkpoints written before values were derived store them all (backbone streams, transform size...):
    stated and consistent, a run trains, samples and resumes from its checkpoint alone."""
    old = ["--model.init_args.backbone.streams", "2", "--model.init_args.backbone.out_streams", "1",
           "--model.init_args.backbone.rope_axes", "2", "--data.transform.init_args.size", "16",
           "--data.transform.init_args.multiple", "1"]
    base = ["fit", "--config", TINY, *SMALL, "--runs_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
            "--data.train_shards", str(image_shards / "*.tar")]
    assert main([*base, *old, "--name", "old", "--trainer.max_steps", "2"]) == 0
    last = tmp_path / "runs/old/checkpoints/last.ckpt"
    assert main(["sample", "--ckpt", str(last), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert main(["fit", "--ckpt_path", str(last), "--trainer.max_steps", "3"]) == 0


@pytest.mark.parametrize("stated,words", [
    (["--data.transform.init_args.size", "32"], ["data.transform.size=32", "model.tokenizer.size", "16"]),
    (["--model.init_args.backbone.rope_axes", "3"], ["model.backbone.rope_axes=3", "ImageFlow"]),
])
def test_a_contradicting_value_stops_the_run_with_one_line(stated: list[str], words: list[str], tmp_path: Path,
                                                           image_shards: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["fit", "--config", TINY, *SMALL, "--runs_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
                 "--data.train_shards", str(image_shards / "*.tar"), "--trainer.max_steps", "1", *stated])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and all(w in err[0] for w in words), err


# ---------------------------------------------------------------- latent codecs: multiple = patch x codec factor


def test_a_latent_codec_multiplies_the_pixel_multiple_and_the_token_cost(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from models.codecs.pretrained import PretrainedAutoencoder
    from models.tokenizers.base import Strides

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(tmp_path / "kl")  # spatial factor 2
    model = ImageFlow(tokenizer=ImagePatches(channels=4, size=8, patch=2), codec=PretrainedAutoencoder(str(tmp_path / "kl")),
                      conditioning=ClassLabel(4),
                      backbone=TINY_BACKBONE)
    spec = model.media_spec()
    assert (spec.size, spec.pixels.multiple) == (16, 4) and "spatial factor 2" in spec.sources["size"]
    t = ImageTransform(keep_aspect=True)
    t.follow(spec)
    x = t({"png": np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8), "__key__": "k"})
    assert t.multiple == 4 and t.cost(x) == (12 // 4) * (20 // 4) == model_tokens(model, x)
    from models.codecs.base import Codec

    codec = type("Clips", (Codec,), {"hop": 8, "temporal_factor": 4})()  # the rest: the base's defaults
    assert Strides.of(codec) == Strides(spatial=1, temporal=4, hop=8)
    one_line_error(lambda: ImageTransform(multiple=2, keep_aspect=True).follow(spec), "data.transform.multiple=2",
                   "model.tokenizer.patch x the codec's spatial factor 2", "4")
