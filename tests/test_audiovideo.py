"""Audio-video pieces: hopping-shape clips with impact sounds, the transform, the sync checker, and the
joint generator's time-aligned audio positions and packed batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from app.evaluation.checkers.audiovideo import CAP_MS, contact_frames, onset_times, sync_scores
from datamodules.audiovideo import CLASSES, AudioVideoTransform, synthetic_audiovideo
from datamodules.decoders import decode_audio
from datamodules.transforms import collate
from models.backbone import MMDiTConfig
from models.codecs.mel import MelCodec
from models.conditioning import ClassLabel
from models.generators import AudioVideoFlow
from models.tokenizers.audio import AudioFrames
from models.tokenizers.video import VideoPatches

FPS, SR = 8, 8000


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return list(synthetic_audiovideo(32, seed=2))


def decoded(sample: dict) -> dict:
    """A generated sample as the pipeline's decoder hands it to a transform."""
    return {"__key__": sample["__key__"], "npy": sample["npy"], "wav": decode_audio(sample["wav"]), "cls": sample["cls"],
            "txt": sample["txt"]}


def wave_of(sample: dict) -> np.ndarray:
    wave, rate = soundfile.read(io.BytesIO(sample["wav"]))
    assert rate == SR
    return wave


def test_synthetic_clips_are_deterministic_and_sound_at_contacts(clips):
    assert [s["wav"] for s in clips[:3]] == [s["wav"] for s in synthetic_audiovideo(3, seed=2)]
    assert {s["cls"] for s in clips} == set(range(len(CLASSES)))
    for sample in clips:
        meta, frames = sample["json"], sample["npy"]
        assert frames.dtype == np.uint8 and frames.shape[1:] == (16, 16, 3) and 6 <= len(frames) <= 12
        assert len(wave_of(sample)) == len(frames) * SR // FPS  # the soundtrack lasts exactly the clip
        assert meta["contact_frames"] and CLASSES[sample["cls"]] in sample["txt"]
        assert contact_frames(frames).tolist() == meta["contact_frames"]  # the checker sees the rendered contacts
        onsets = onset_times(wave_of(sample), SR)
        assert np.allclose(onsets, np.asarray(meta["contact_frames"]) / FPS, atol=0.006)  # a sound at each contact


def test_sync_scores_real_zero_noise_and_shifted_bad(clips):
    videos, waves = [s["npy"] for s in clips], [wave_of(s) for s in clips]
    real = sync_scores(videos, waves, FPS, SR)
    assert real["sync_offset_ms"] <= 6 and real["sync_f1"] == 1.0 and real["contact_clips"] == 1.0
    shifted = sync_scores(videos, [np.roll(w, SR // FPS * 2) for w in waves], FPS, SR)  # audio 2 frames late
    assert shifted["sync_offset_ms"] > 100 and shifted["sync_f1"] < 0.5
    rng = np.random.default_rng(0)
    noise = sync_scores([rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8) for _ in range(4)],
                        [rng.normal(0, 0.3, SR) for _ in range(4)], FPS, SR)
    assert noise["sync_offset_ms"] == CAP_MS and noise["sync_f1"] == 0.0 and noise["contact_clips"] == 0.0
    with pytest.raises(ValueError, match="as many"):
        sync_scores(videos, waves[:-1], FPS, SR)


def test_transform_aligns_audio_with_kept_frames(clips):
    transform = AudioVideoTransform(size=16, max_frames=8, frame_multiple=2)
    out = [transform(decoded(s)) for s in clips[:8]]
    for sample, o in zip(clips, out):
        t = o["x"].shape[1]
        assert o["x"].shape == (3, t, 16, 16) and t == min(len(sample["npy"]), 8) // 2 * 2
        assert o["audio"].shape == (t * SR // FPS,) and o["cls"] == sample["cls"]
        assert torch.allclose(o["audio"], torch.from_numpy(wave_of(sample)[: t * SR // FPS]).float(), atol=1e-6)
    batch = collate(out)
    assert isinstance(batch["x"], list) and isinstance(batch["audio"], list)  # mixed lengths: packed by the model


def small_model(tpatch: int = 1) -> AudioVideoFlow:
    return AudioVideoFlow(
        tokenizer=VideoPatches(frames=8, size=16, patch=4, tpatch=tpatch), audio_tokenizer=AudioFrames(frames=64, patch=2),
        backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1, streams=3, out_streams=2, rope_axes=3),
        audio_codec=MelCodec(hop=125), fps=FPS, sample_rate=SR, conditioning=ClassLabel(4),
    )


@pytest.mark.parametrize("tpatch", [1, 2])
def test_audio_positions_share_the_video_time_axis(tpatch):
    model = small_model(tpatch)
    # audio token n spans mel frames 2n, 2n + 1 (centred on samples 250 n and 250 n + 125): 4 tokens per video frame
    pos = model.audio_positions(torch.arange(32, dtype=torch.float32)[None, :, None])  # (1, 32, 3)
    assert torch.equal(pos[..., 1:], torch.zeros(1, 32, 2))
    seconds = (torch.arange(32) * 250 + 62.5) / SR
    video_pos = (seconds * FPS - (tpatch - 1) / 2) / tpatch  # video token j holds frames j k .. j k + k - 1
    assert torch.allclose(pos[0, :, 0], video_pos)
    first_of_frame_3 = (3 + 1 / 16 - (tpatch - 1) / 2) / tpatch  # frame 3's first audio token: 1/16 frame after it
    assert pos[0, 4 * 3, 0] == pytest.approx(first_of_frame_3)
    with pytest.raises(ValueError, match="audio_tokenizer.frames"):
        AudioVideoFlow(tokenizer=VideoPatches(frames=8), audio_tokenizer=AudioFrames(frames=32),
                       backbone=MMDiTConfig(streams=3, out_streams=2, rope_axes=3))


def test_packed_joint_batch_matches_per_sample(clips):
    """Clips of different lengths packed in one batch give each clip the loss it gets alone (no leaks)."""
    model = small_model().eval()
    transform = AudioVideoTransform(size=16, max_frames=8, frame_multiple=1)
    samples = [transform(decoded(s)) for s in clips[:3]]
    assert len({s["x"].shape[1] for s in samples}) > 1
    xs = model.tokens(collate(samples))
    assert all(x.layout.is_packed for x in xs)
    t = torch.tensor([0.3, 0.6, 0.9])
    drop = torch.zeros(3, dtype=torch.bool)
    cond = {"cls": [s["cls"] for s in samples]}
    with torch.no_grad():
        packed = model.velocity_tokens(xs, t, cond, drop)
        for i, sample in enumerate(samples):
            alone = model.velocity_tokens(model.tokens(collate([sample])), t[i : i + 1], {"cls": cond["cls"][i : i + 1]},
                                          drop[:1])
            for stream, (v, x) in enumerate(zip(packed, xs)):
                lengths = x.token_counts()
                start = sum(lengths[:i])
                assert torch.allclose(v[0, start : start + lengths[i]], alone[stream][0], atol=1e-5)
