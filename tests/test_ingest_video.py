"""`shards videos` / `shards audiovideo`: clips cut by timestamp from real video files, their soundtracks, the folder rules.

The files are made here with PyAV, a few frames of 32x24: frame i of an "indexed" video is a flat
grey of level 8 i, so a stored frame says which source frame it is (round(mean / 8)).
"""

from __future__ import annotations

import csv
import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from datamodules.decoders import decode_audio
from datamodules.video_clips import ClipOptions, read_clips
from tests.shard_files import shard_samples

W, H = 32, 24
LEVEL = 8


def indexed_frames(n: int) -> np.ndarray:
    """(n, H, W, 3) uint8: frame i is the flat grey LEVEL * i."""
    return np.repeat((np.arange(n, dtype=np.uint8) * LEVEL)[:, None, None, None], 3, axis=3) * np.ones((1, H, W, 1), np.uint8)


def moving_square(n: int) -> np.ndarray:
    frames = np.full((n, H, W, 3), 40, np.uint8)
    for i in range(n):
        frames[i, 8:16, i % (W - 8) : i % (W - 8) + 8] = (230, 60, 60)
    return frames


def frame_indices(clip: np.ndarray) -> list[int]:
    return [round(float(frame.mean()) / LEVEL) for frame in clip]


def two_tones(seconds: float, rate: int, change: float, low: float = 440.0, high: float = 1000.0) -> np.ndarray:
    """(S,) float: a tone of ``low`` Hz until ``change`` seconds, then ``high`` Hz (phase continuous), at 0.5."""
    t = np.arange(round(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(np.where(t < change, low, high)) / rate
    return 0.5 * np.sin(phase)


CONTAINERS = {".mkv": ("matroska", "libx264", "yuv420p"), ".mov": ("mov", "libx264", "yuv420p"),
              ".webm": ("webm", "libvpx", "yuv420p"), ".avi": ("avi", "mpeg4", "yuv420p"), ".gif": ("gif", "gif", "rgb8")}
"""Extension -> (muxer, video codec, pixel format) of the test files other than MP4."""


def write_video(path: Path, frames: np.ndarray, fps: int = 10, audio: np.ndarray | None = None, rate: int = 16000,
                delay: int = 0) -> Path:
    """MP4 (H.264, AAC) via write_mp4; other CONTAINERS, .mkv/.mov with 16-bit PCM stereo (``audio`` (S, 2), or (S,) on both)
    starting at 0 s while the first frame is shown at ``delay`` frames."""
    import av

    from datamodules.media.video import write_mp4

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":
        return write_mp4(frames, path, fps=fps, audio=audio, sample_rate=rate if audio is not None else None)
    muxer, codec, pixels = CONTAINERS[path.suffix]
    with av.open(str(path), "w", format=muxer) as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = W, H, pixels
        video.options = {"qscale": "1"} if codec == "mpeg4" else {}
        if audio is not None:  # every stream before the first packet
            sound = container.add_stream("pcm_s16le", rate=rate)
            sound.layout = "stereo"
        for i, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(frame, format="rgb24")
            image.pts, image.time_base = delay + i, Fraction(1, fps)
            container.mux(video.encode(image.reformat(format=pixels) if pixels == "rgb8" else image))
        container.mux(video.encode(None))
        if audio is not None:
            stereo = audio[:, None].repeat(2, axis=1) if audio.ndim == 1 else audio  # (S, 2)
            packed = np.round(np.clip(stereo, -1, 1) * 32767).astype(np.int16).reshape(1, -1)  # (1, S * 2): L R L R ...
            chunk = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
            chunk.sample_rate, chunk.pts = rate, 0
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return path


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def run(*argv: str) -> int:
    from app.__main__ import main

    return main(["shards", *argv])


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# clip timing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 10 fps (20 frames) with a 440 Hz -> 1000 Hz tone changing at 0.8 s (AAC)."""
    folder = tmp_path_factory.mktemp("indexed")
    return write_video(folder / "count.mp4", indexed_frames(20), fps=10, audio=two_tones(2.0, 16000, 0.8))


@pytest.mark.parametrize("fps, stride, expected", [
    (5, None, [(0.0, [0, 2, 4, 6]), (0.8, [8, 10, 12, 14])]),  # back to back; a clip at 1.6 s would need 2.2 s
    (5, 0.5, [(0.0, [0, 2, 4, 6]), (0.5, [5, 7, 9, 11]), (1.0, [10, 12, 14, 16])]),  # overlapping starts
    (4, None, [(0.0, [0, 2, 5, 7]), (1.0, [10, 12, 15, 17])]),  # 0.25 s -> the frame of 0.2 s, not every 2.5th index
    (20, 0.3, [(0.0, [0, 0, 1, 1]), (0.3, [3, 3, 4, 4]), (0.6, [6, 6, 7, 7])]),  # slower source: frames repeat
])
def test_frames_are_the_source_frames_shown_at_start_plus_k_over_fps(indexed, fps, stride, expected):
    options = ClipOptions(frames=4, fps=fps, stride=stride, size=16, max_clips=3)
    clips = read_clips(indexed, options).clips
    assert [(float(c.start), frame_indices(c.frames)) for c in clips] == expected
    assert all(c.frames.shape == (4, 16, 16, 3) and c.frames.dtype == np.uint8 for c in clips)


def test_command_writes_npy_clips_with_metadata(indexed, tmp_path, capsys):
    assert run("videos", str(indexed.parent), str(tmp_path / "out"), "--frames", "4", "--fps", "5", "--stride", "0.5",
               "--size", "16") == 0
    samples = shard_samples(tmp_path / "out")
    assert sorted(samples) == ["000000-0000", "000000-0001", "000000-0002"]
    sample = samples["000000-0001"]
    assert sorted(sample) == ["json", "npy"]  # no class folder, no caption, no sound
    assert frame_indices(npy(sample["npy"])) == [5, 7, 9, 11]
    assert json.loads(sample["json"]) == {"path": "count.mp4", "start": 0.5, "end": 1.3, "fps": 5.0, "frames": 4}
    summary = capsys.readouterr().out
    assert "3 clips from 1 video in" in summary and "files/s" in summary and "clips/s" in summary and "0 skipped" in summary
    print(summary)  # throughput of this small run: pytest -s shows it


@pytest.mark.parametrize("ext", sorted(CONTAINERS))
def test_every_container(tmp_path, ext):
    video = write_video(tmp_path / f"count{ext}", indexed_frames(20), fps=10)
    clips = read_clips(video, ClipOptions(frames=4, fps=5, size=16)).clips
    assert [frame_indices(c.frames) for c in clips] == [[0, 2, 4, 6], [8, 10, 12, 14]]


def test_keep_aspect(tmp_path):
    gif = write_video(tmp_path / "count.gif", indexed_frames(20), fps=10)
    (wide,) = read_clips(gif, ClipOptions(frames=2, fps=5, size=16, keep_aspect=True, multiple=4, max_clips=1)).clips
    assert wide.frames.shape == (2, 12, 20, 3)  # 32x24 at about 16^2 pixels: 18.5 x 13.9 -> multiples of 4


def test_min_motion_skips_still_clips_and_short_videos_are_counted(tmp_path, capsys):
    src = tmp_path / "src"
    write_video(src / "moving.mp4", moving_square(12))
    write_video(src / "still.mp4", np.full((12, H, W, 3), 90, np.uint8))
    write_video(src / "short.mp4", moving_square(3))  # 0.3 s: one clip of 4 frames at 5 fps needs 0.6 s
    assert run("videos", str(src), str(tmp_path / "out"), "--frames", "4", "--fps", "5", "--size", "16",
               "--min-motion", "2") == 0
    summary = capsys.readouterr().out
    assert "1 clip from 1 video in" in summary
    assert "1 too short (short.mp4)" in summary and "1 clip below --min-motion" in summary
    assert list(shard_samples(tmp_path / "out")) == ["000000-0000"]  # moving.mp4 is the first file


# audio-video ------------------------------------------------------------------------------------


def test_soundtrack_is_exactly_the_clips_span(tmp_path):
    import torch
    import torchaudio.functional as AF

    tone = two_tones(2.0, 16000, 0.8)
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)  # the tone left, silence right: mono is half the tone
    mkv = write_video(tmp_path / "count.mkv", indexed_frames(20), audio=stereo)  # PCM: the source samples exactly
    options = ClipOptions(frames=2, fps=5, stride=0.3, size=16, sample_rate=8000)
    clips = read_clips(mkv, options).clips
    assert [float(c.start) for c in clips] == [0.0, 0.3, 0.6, 0.9, 1.2, 1.5]
    heard = AF.resample(torch.from_numpy(np.round(tone * 32767) / 32767 / 2).float(), 16000, 8000).numpy()  # whole track
    for clip in clips:
        assert clip.audio.shape == (3200,)  # T / fps = 0.4 s at 8000 Hz
        first = round(float(clip.start) * 8000)
        np.testing.assert_allclose(clip.audio, heard[first : first + 3200], atol=1e-4)
    first_two = read_clips(mkv, ClipOptions(frames=2, fps=5, stride=0.3, size=16, sample_rate=8000, max_clips=2)).clips
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(first_two, clips[:2], strict=True))  # stopped early, same sound
    straddling = clips[2].audio  # 0.6 - 1.0 s; the tone changes at 0.8 s, sample 1600 of the clip
    assert dominant_hz(straddling[:1500], 8000) == pytest.approx(440, abs=12)
    assert dominant_hz(straddling[1700:], 8000) == pytest.approx(1000, abs=12)


def test_soundtrack_follows_the_container_clock_when_the_video_starts_late(tmp_path):
    tone = two_tones(2.0, 16000, 0.8)
    mkv = write_video(tmp_path / "late.mkv", indexed_frames(15), audio=tone, delay=5)  # frames from 0.5 s, sound from 0 s
    clips = read_clips(mkv, ClipOptions(frames=2, fps=5, stride=0.3, size=16, sample_rate=8000)).clips
    first = clips[0]  # 0 s after the first frame = 0.5 s of sound: the change (0.8 s) is 0.3 s into the clip
    assert frame_indices(first.frames) == [0, 2]
    assert dominant_hz(first.audio[:2200], 8000) == pytest.approx(440, abs=12)
    assert dominant_hz(first.audio[2600:], 8000) == pytest.approx(1000, abs=12)


def test_audiovideo_command_aac_soundtrack_stays_in_sync(indexed, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "count.mp4").parent.mkdir()
    (src / "count.mp4").write_bytes(indexed.read_bytes())
    write_video(src / "silent.mp4", moving_square(20))  # no audio stream
    (src / "empty.mp4").write_bytes(b"")
    (src / "notes.mp4").write_text("not a video")
    assert run("audiovideo", str(src), str(tmp_path / "out"), "--frames", "2", "--fps", "5", "--stride", "0.3",
               "--size", "16", "--sample-rate", "8000") == 0
    out, err = capsys.readouterr()
    assert "6 clips from 1 video in" in out
    assert "3 skipped: 2 unreadable (empty.mp4, notes.mp4), 1 without audio (silent.mp4)" in out
    assert "Traceback" not in out + err
    samples = shard_samples(tmp_path / "out")
    for key, sample in samples.items():
        audio, rate = decode_audio(sample["wav"])
        assert rate == 8000 and audio.shape == (3200, 1)  # exactly T / fps seconds, mono
        start = json.loads(sample["json"])["start"]
        assert json.loads(sample["json"])["sample_rate"] == 8000
        if start + 0.4 <= 0.8:
            assert dominant_hz(audio[:, 0], 8000) == pytest.approx(440, abs=12), key
        elif start >= 0.8:
            assert dominant_hz(audio[:, 0], 8000) == pytest.approx(1000, abs=12), key
    straddling = decode_audio(samples["000000-0002"]["wav"])[0][:, 0]  # 0.6 - 1.0 s: the change at sample 1600
    assert dominant_hz(straddling[:1500], 8000) == pytest.approx(440, abs=12)
    assert dominant_hz(straddling[1700:], 8000) == pytest.approx(1000, abs=12)


# folders, captions, classes, splits -------------------------------------------------------------


def test_class_folders_and_captions_from_sidecars_and_manifests(tmp_path):
    src = tmp_path / "src"
    for name in ("cat/a.mp4", "cat/b.mp4", "dog/c.mp4", "dog/d.mp4"):
        write_video(src / name, moving_square(6))
    (src / "cat/a.txt").write_text("a cat from txt\n")
    (src / "cat/b.json").write_text(json.dumps({"caption": "a cat from json"}))
    (src / "dog/c.json").write_text(json.dumps({"text": "a dog from json text"}))
    common = ["--frames", "2", "--fps", "5", "--size", "16", "--max-clips", "1"]
    assert run("videos", str(src), str(tmp_path / "plain"), *common) == 0
    assert json.loads((tmp_path / "plain/classes.json").read_text()) == ["cat", "dog"]
    samples = shard_samples(tmp_path / "plain")
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert {p: (int(s["cls"]), json.loads(s["json"])["class"]) for p, s in by_path.items()} == {
        "cat/a.mp4": (0, "cat"), "cat/b.mp4": (0, "cat"), "dog/c.mp4": (1, "dog"), "dog/d.mp4": (1, "dog")}
    assert {p: s.get("txt", b"").decode() for p, s in by_path.items()} == {
        "cat/a.mp4": "a cat from txt", "cat/b.mp4": "a cat from json", "dog/c.mp4": "a dog from json text", "dog/d.mp4": ""}

    manifest = tmp_path / "captions.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], ["cat/a.mp4", "from the csv"], ["dog/d.mp4", "a dog, from the csv"]])
    assert run("videos", str(src), str(tmp_path / "csv"), *common, "--captions", str(manifest)) == 0
    captions = {json.loads(s["json"])["path"]: s.get("txt", b"").decode() for s in shard_samples(tmp_path / "csv").values()}
    assert captions["cat/a.mp4"] == "from the csv" and captions["dog/d.mp4"] == "a dog, from the csv"  # the manifest wins
    assert captions["cat/b.mp4"] == "a cat from json"  # no row: the sidecar


def test_jsonl_manifest_labels_a_flat_folder(tmp_path):
    src = tmp_path / "src"
    for name in ("x.mp4", "y.mp4", "z.mp4"):
        write_video(src / name, moving_square(6))
    rows = [{"path": "x.mp4", "caption": "ex", "class": "run"}, {"path": "y.mp4", "caption": "why", "class": "jump"},
            {"path": "z.mp4", "text": "zed"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run("videos", str(src), str(tmp_path / "out"), "--frames", "2", "--fps", "5", "--size", "16",
               "--max-clips", "1", "--captions", str(tmp_path / "m.jsonl")) == 0
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["jump", "run"]
    got = {json.loads(s["json"])["path"]: (s.get("cls", b"-").decode(), s["txt"].decode())
           for s in shard_samples(tmp_path / "out").values()}
    assert got == {"x.mp4": ("1", "ex"), "y.mp4": ("0", "why"), "z.mp4": ("-", "zed")}


def test_holdout_is_deterministic_splits_by_video_and_workers_do_not_change_bytes(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(8):
        write_video(src / f"v{i}.mp4", moving_square(10))
    common = ["--frames", "2", "--fps", "5", "--stride", "0.4", "--size", "16", "--holdout", "0.4", "--shard-size", "3"]
    assert run("videos", str(src), str(tmp_path / "one"), *common) == 0
    assert run("videos", str(src), str(tmp_path / "two"), *common, "--workers", "2") == 0
    print(capsys.readouterr().out)
    for split in ("train", "holdout"):
        one, two = sorted((tmp_path / "one" / split).iterdir()), sorted((tmp_path / "two" / split).iterdir())
        assert [p.name for p in one] == [p.name for p in two]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))  # byte-identical, 1 or 2 workers
    videos = {split: {json.loads(s["json"])["path"] for s in shard_samples(tmp_path / "one" / split).values()}
              for split in ("train", "holdout")}
    assert videos["train"] and videos["holdout"] and not videos["train"] & videos["holdout"]
    assert videos["train"] | videos["holdout"] == {f"v{i}.mp4" for i in range(8)}
    clips = [json.loads(s["json"])["path"] for s in shard_samples(tmp_path / "one" / "holdout").values()]
    assert len(clips) == 2 * len(videos["holdout"])  # 1 s each: clips at 0 and 0.4 s, all of a held-out video held out


# errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["videos", "{tmp}/missing", "{tmp}/out"], "does not exist"),
    (["videos", "{tmp}/empty", "{tmp}/out"], "holds no videos"),
    (["videos", "{tmp}/bad", "{tmp}/out"], "no clips written"),
    (["videos", "{tmp}/empty", "{tmp}/out", "--frames", "0"], "--frames: expected 1 to"),
    (["audiovideo", "{tmp}/empty", "{tmp}/out", "--sample-rate", "0"], "--sample-rate: expected >= 1 Hz"),
    (["videos", "{tmp}/bad", "{tmp}/out", "--holdout", "1.5"], "--holdout: expected a fraction"),
    (["videos", "{tmp}/bad", "{tmp}/out", "--captions", "{tmp}/none.csv"], "--captions"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/zero.mp4").write_bytes(b"")
    assert run(*(a.format(tmp=tmp_path) for a in argv)) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # after the progress bar, if any
    assert message in line and "Traceback" not in err


# the shards train -------------------------------------------------------------------------------


def test_shards_read_through_the_training_transforms(indexed, tmp_path):
    from datamodules.audiovideo import AudioVideoTransform
    from datamodules.shards import read_samples
    from datamodules.video import VideoTransform

    assert run("audiovideo", str(indexed.parent), str(tmp_path / "out"), "--frames", "4", "--fps", "5",
               "--stride", "0.3", "--size", "16", "--sample-rate", "8000") == 0
    shards = str(tmp_path / "out")
    video = read_samples(shards, VideoTransform(size=16, max_frames=4), 4)
    assert video["x"].shape == (4, 3, 4, 16, 16) and video["x"].min() >= -1 and video["x"].max() <= 1
    both = read_samples(shards, AudioVideoTransform(size=16, max_frames=4, fps=5, sample_rate=8000), 4)
    assert both["x"].shape == (4, 3, 4, 16, 16) and both["audio"].shape == (4, 6400)
