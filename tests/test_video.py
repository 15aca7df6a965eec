"""Video pieces: synthetic clips, the transform, MP4 in and out, the tubelet tokenizer and the checker."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from app.evaluation.checkers.video import video_attributes, video_scores
from datamodules import decoders
from datamodules.decoders import BadSample, decode_sample
from datamodules.media.video import save_videos, write_mp4
from datamodules.synthetic import COLOURS, SHAPES, render_shape, write_synthetic
from datamodules.video import VideoTransform, bounce, synthetic_videos
from models.tokenizers.video import VideoPatches
from tests.mp4 import read_mp4


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return list(synthetic_videos(64, seed=0))


def mp4_bytes(frames: np.ndarray, tmp_path, **kwargs) -> bytes:
    return write_mp4(frames, tmp_path / "clip.mp4", **kwargs).read_bytes()


# ---------------------------------------------------------------- synthetic clips


def test_synthetic_videos_deterministic_and_varied(clips):
    again, other = list(synthetic_videos(64, seed=0)), list(synthetic_videos(64, seed=1))
    for a, b in zip(clips, again):
        assert a["npy"].tobytes() == b["npy"].tobytes() and a["txt"] == b["txt"] and a["json"] == b["json"]
    assert any(a["npy"].shape != b["npy"].shape or not np.array_equal(a["npy"], b["npy"]) for a, b in zip(clips, other))
    assert next(synthetic_videos(1, seed=0))["npy"].tobytes() == clips[0]["npy"].tobytes()  # independent of num
    lengths = {len(c["npy"]) for c in clips}
    assert min(lengths) >= 4 and max(lengths) <= 12 and len(lengths) >= 5
    assert {c["cls"] for c in clips} == set(range(len(SHAPES)))
    assert any(c["json"]["colour_after"] for c in clips) and any(c["json"]["colour_after"] is None for c in clips)
    for c in clips:
        meta, clip = c["json"], c["npy"]
        assert clip.dtype == np.uint8 and clip.shape == (meta["frames"], 16, 16, 3) and SHAPES[c["cls"]] == meta["shape"]
        assert c["txt"].startswith(f"a {meta['colour']} {meta['shape']} moving ")
        assert c["txt"].endswith(f", turning {meta['colour_after']}") == (meta["colour_after"] is not None)
        # the json reproduces the first frame
        first = render_shape(meta["shape"], COLOURS[meta["colour"]], 4, meta["x0"], meta["y0"], meta["scale"], 16)
        assert np.array_equal(clip[0], first)
    short = list(synthetic_videos(8, seed=3, size=24, min_frames=2, max_frames=3))
    assert all(s["npy"].shape[1:] == (24, 24, 3) and 2 <= len(s["npy"]) <= 3 for s in short)
    with pytest.raises(ValueError, match="min_frames"):
        next(synthetic_videos(1, min_frames=5, max_frames=4))


def test_bounce_stays_inside_and_keeps_speed():
    steps = np.arange(200)
    x = bounce(0.3, 0.07, 0.2, 0.8, steps)
    assert x.min() >= 0.2 - 1e-12 and x.max() <= 0.8 + 1e-12 and x[0] == pytest.approx(0.3)
    assert np.all(np.abs(np.diff(x)) <= 0.07 + 1e-9)
    assert np.sum(np.abs(np.diff(x)) > 0.07 - 1e-9) > 150  # only the bounce steps are shorter


def test_video_shards_round_trip(tmp_path):
    paths = write_synthetic("video", str(tmp_path), num=5, shard_size=3, seed=0, image_size=8, progress=False)
    raw = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                raw.setdefault(key, {"__key__": key, "__url__": path})[ext] = tar.extractfile(info).read()
    assert len(raw) == 5
    transform = VideoTransform(size=8, max_frames=16)
    for sample, expected in zip((decode_sample(r) for r in raw.values()), synthetic_videos(5, seed=0, size=8)):
        assert np.array_equal(sample["npy"], expected["npy"]) and sample["json"] == expected["json"]
        out = transform(sample)
        assert out["x"].shape == (3, len(expected["npy"]), 8, 8) and out["txt"] == expected["txt"]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "patch, tpatch, shape", [(2, 1, (5, 4, 6)), (2, 2, (4, 8, 8)), (4, 3, (3, 4, 12)), (1, 1, (1, 1, 1))]
)
def test_video_patches_round_trip(patch, tpatch, shape):
    tokenizer = VideoPatches(channels=3, frames=6 * tpatch, size=4 * patch, patch=patch, tpatch=tpatch)
    x = torch.randn(2, 3, *shape)
    tokens, pos = tokenizer.tokenize(x)
    n = tokenizer.num_tokens(*shape)
    assert tokens.shape == (2, n, tokenizer.token_dim) and pos.shape == (2, n, 3)
    assert torch.equal(tokenizer.untokenize(tokens, tuple(x.shape)), x)
    assert tokenizer.token_dim == 3 * tpatch * patch * patch and VideoPatches.rope_axes == 3
    assert tokenizer.latent_shape() == (3, 6 * tpatch, 4 * patch, 4 * patch)
    assert tokenizer.num_tokens() == 6 * 4 * 4


def test_video_patches_positions_and_errors():
    tokenizer = VideoPatches(channels=1, frames=4, size=4, patch=2, tpatch=2)
    x = torch.arange(4 * 2 * 4, dtype=torch.float32).reshape(1, 1, 4, 2, 4)  # (B, C, T, H, W)
    tokens, pos = tokenizer.tokenize(x)
    assert pos[0].tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]  # (t, row, col), t slowest
    assert torch.equal(tokens[0, 3], x[0, 0, 2:4, 0:2, 2:4].reshape(-1))  # second tubelet in time, right column
    with pytest.raises(ValueError, match="multiple of tpatch"):
        tokenizer.tokenize(torch.zeros(1, 1, 3, 2, 4))
    with pytest.raises(ValueError, match="frames=3"):
        VideoPatches(frames=3, tpatch=2)
    with pytest.raises(ValueError, match="size=15"):
        VideoPatches(size=15, patch=2)


# ---------------------------------------------------------------- transform and decoding


def test_video_transform_synthetic_sample(clips):
    sample = clips[1]
    out = VideoTransform(size=16, max_frames=16)(sample)
    clip = torch.from_numpy(sample["npy"]).float() / 127.5 - 1  # (T, H, W, 3)
    assert out["x"].dtype == torch.float32 and torch.equal(out["x"], clip.permute(3, 0, 1, 2))
    assert (out["cls"], out["txt"], out["__key__"]) == (sample["cls"], sample["txt"], sample["__key__"])
    # larger, non-square frames: resized and cropped per frame; frames truncated to a multiple of 4 within 8
    big = np.repeat(np.repeat(sample["npy"], 2, axis=1), 3, axis=2)  # (T, 32, 48, 3)
    out = VideoTransform(size=16, max_frames=8, frame_multiple=4)({"__key__": "k", "npy": big})
    assert out["x"].shape == (3, 8, 16, 16) and out["x"].min() >= -1 and out["x"].max() <= 1
    float_clip = sample["npy"][:5].astype(np.float32) / 255
    out = VideoTransform(size=16, frame_multiple=2)({"__key__": "k", "npy": float_clip})
    assert out["x"].shape == (3, 4, 16, 16)


def test_video_transform_mp4_sample(clips, tmp_path):
    sample = clips[2]
    data = mp4_bytes(sample["npy"], tmp_path, upscale=2)
    decoded = decode_sample({"__key__": sample["__key__"], "__url__": "v.tar", "mp4": data, "cls": b"1"})
    assert decoded["mp4"].shape == (len(sample["npy"]), 32, 32, 3) and decoded["mp4"].dtype == np.uint8
    out = VideoTransform(size=16, video_key="npy,mp4")(decoded)
    expected = torch.from_numpy(sample["npy"]).float().permute(3, 0, 1, 2) / 127.5 - 1
    assert out["x"].shape == expected.shape and (out["x"] - expected).abs().mean() < 0.03
    assert out["cls"] == 1


def test_video_transform_bad_samples(tmp_path):
    transform = VideoTransform(size=16, frame_multiple=4)
    bad = [
        ({"txt": "no clip"}, "missing field"),
        ({"npy": np.zeros((4, 16, 16, 3), np.int32)}, "dtype int32"),
        ({"npy": np.zeros((4, 16, 16), np.uint8)}, r"\(T, H, W, 3\)"),
        ({"npy": np.full((4, 16, 16, 3), np.nan, np.float32)}, "NaN"),
        ({"npy": np.zeros((3, 16, 16, 3), np.uint8)}, "3 frames, expected at least frame_multiple=4"),
        ({"npy": np.zeros((4, 0, 16, 3), np.uint8)}, "shape"),
    ]
    for fields, message in bad:
        with pytest.raises(BadSample, match=f"v.tar:k.*{message}"):
            transform({"__key__": "k", "__url__": "v.tar", **fields})
    with pytest.raises(ValueError, match="max_frames=2 must be at least frame_multiple=4"):
        VideoTransform(max_frames=2, frame_multiple=4)


def test_decode_video_refuses_garbage_and_oversized(tmp_path, monkeypatch):
    with pytest.raises(BadSample, match="v.tar:k: mp4"):
        decode_sample({"__key__": "k", "__url__": "v.tar", "mp4": b"not an mp4 at all"})
    data = mp4_bytes(np.zeros((5, 8, 8, 3), np.uint8), tmp_path)
    assert decoders.decode_video(data).shape == (5, 8, 8, 3)
    monkeypatch.setattr(decoders, "MAX_VIDEO_FRAMES", 3)
    with pytest.raises(BadSample, match="v.tar:k: mp4: .*MAX_VIDEO_FRAMES=3"):
        decode_sample({"__key__": "k", "__url__": "v.tar", "mp4": data})
    monkeypatch.setattr(decoders, "MAX_VIDEO_FRAMES", 2048)
    monkeypatch.setattr(decoders, "MAX_IMAGE_PIXELS", 63)
    with pytest.raises(BadSample, match="MAX_IMAGE_PIXELS=63"):
        decoders.decode_video(data)


# ---------------------------------------------------------------- MP4 files


def test_write_read_mp4_round_trip(clips, tmp_path):
    frames = clips[3]["npy"]
    path = write_mp4(frames, tmp_path / "sub" / "a.mp4", fps=8, upscale=3)
    video, audio, fps, rate = read_mp4(path)
    assert video.shape == (len(frames), 48, 48, 3) and audio is None and rate is None and fps == 8
    assert np.abs(video[:, ::3, ::3].astype(int) - frames).mean() < 4  # nearest-neighbour upscale, near-lossless
    odd = write_mp4(np.zeros((2, 15, 9, 3), np.uint8), tmp_path / "odd.mp4")
    assert read_mp4(odd)[0].shape == (2, 16, 10, 3)  # padded to even sides for yuv420p

    rate = 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)  # one second
    for audio_in in (tone, np.stack([tone, -tone], 1)):
        path = write_mp4(frames, tmp_path / "av.mp4", fps=8, audio=audio_in, sample_rate=rate)
        video, audio, fps, sample_rate = read_mp4(path)
        channels = 1 if audio_in.ndim == 1 else 2
        assert len(video) == len(frames) and sample_rate == rate and audio.dtype == np.float32
        assert audio.shape[1] == channels and abs(len(audio) - rate) <= 1024  # within one AAC frame
        reference = audio_in.reshape(rate, channels)
        n = min(len(audio), rate)
        assert np.abs(audio[:n] - reference[:n]).mean() < 0.05  # aligned: the encoder delay is trimmed

    with pytest.raises(ValueError, match="frames: expected a non-empty uint8"):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "bad.mp4")
    for rate in (None, 10000):  # AAC has a fixed set of rates
        with pytest.raises(ValueError, match="sample_rate: expected one of"):
            write_mp4(frames, tmp_path / "bad.mp4", audio=tone, sample_rate=rate)


def test_save_videos(tmp_path):
    x = torch.rand(3, 3, 5, 16, 16) * 2 - 1
    paths = save_videos(x, tmp_path, prefix="s", fps=4, upscale=2)
    assert [p.name for p in paths] == ["s-0000.mp4", "s-0001.mp4", "s-0002.mp4", "s-grid.png"]
    video, _, fps, _ = read_mp4(paths[0])
    assert video.shape == (5, 32, 32, 3) and fps == 4
    from PIL import Image

    with Image.open(paths[-1]) as grid:  # one row of 5 frames per clip, 2 px padding, upscaled twice
        assert grid.size == (2 * (5 * 18 + 2), 2 * (3 * 18 + 2))


# ---------------------------------------------------------------- checker


def test_checker_reads_synthetic_clips_back(clips):
    attributes = video_attributes([c["npy"] for c in clips])
    scores = video_scores([c["npy"] for c in clips], [c["cls"] for c in clips])
    assert scores["shape_accuracy"] >= 0.9 and scores["temporal_consistency"] >= 0.9 and scores["valid_frames"] == 1.0
    metas = [c["json"] for c in clips]
    colours = [(a["colour"], a["colour_after"]) == (m["colour"], m["colour_after"]) for a, m in zip(attributes, metas)]
    assert np.mean(colours) >= 0.9
    errors = [np.abs(np.subtract(a["velocity"], (m["vx"], m["vy"]))).max() for a, m in zip(attributes, metas)]
    assert np.median(errors) < 0.003 and np.mean(np.array(errors) < 0.01) >= 0.9  # side per frame; speeds 0.04 to 0.1
    rng = np.random.default_rng(0)  # a little pixel noise, as in generated samples, changes nothing
    noisy = [np.clip(c["npy"] + rng.normal(0, 8, c["npy"].shape), 0, 255).astype(np.uint8) for c in clips]
    scores = video_scores(noisy, [c["cls"] for c in clips])
    assert scores["shape_accuracy"] >= 0.9 and scores["temporal_consistency"] >= 0.9 and scores["valid_frames"] == 1.0


def test_checker_scores_noise_and_constant_clips_low(clips):
    rng = np.random.default_rng(0)
    labels = [c["cls"] for c in clips[:16]]
    noise = np.clip(np.rint((rng.standard_normal((16, 8, 16, 16, 3)) + 1) * 127.5), 0, 255).astype(np.uint8)
    flat = np.full((16, 8, 16, 16, 3), 128, np.uint8)
    empty = np.broadcast_to(np.array((18, 18, 24), np.uint8), (16, 8, 16, 16, 3))
    for bad in (noise, flat, empty):
        scores = video_scores(bad, labels)
        assert scores["shape_accuracy"] <= 0.3 and scores["temporal_consistency"] <= 0.1, scores

    def at(shape: str, cx: float, cy: float) -> np.ndarray:
        return render_shape(shape, COLOURS["red"], 4, cx, cy, 0.45, 16)

    # the right shape in every frame, but teleporting, or turning back mid-frame: shapes right, motion wrong
    jumping = [np.stack([at(SHAPES[y], *rng.uniform(0.25, 0.75, 2)) for _ in range(8)]) for y in labels]
    swinging = [np.stack([at(SHAPES[y], 0.4, 0.4), at(SHAPES[y], 0.55, 0.55)] * 4) for y in labels]
    for bad in (jumping, swinging):
        scores = video_scores(bad, labels)
        assert scores["shape_accuracy"] >= 0.9 and scores["temporal_consistency"] <= 0.3, scores
    still = [np.repeat(at(SHAPES[y], 0.5, 0.5)[None], 8, axis=0) for y in labels]
    assert video_scores(still, labels)["temporal_consistency"] == 1.0  # documented: a still object is consistent
    with pytest.raises(ValueError, match="expected 16 labels"):
        video_scores(noise, labels[:3])
    with pytest.raises(ValueError, match="clip 0: expected a uint8"):
        video_attributes([np.zeros((2, 8, 8, 3), np.float32)])
