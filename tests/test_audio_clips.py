"""`shards audio --max-seconds ...`: long recordings cut at pauses, made mono, resampled, levelled; spans in metadata."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from app.__main__ import main
from datamodules.audio_clips import AudioClipOptions, cut_spans, level_db
from tests.shard_files import shard_samples

SOURCE_RATE = 48000
PAUSES = ((4.2, 4.8), (9.6, 10.0), (15.5, 16.0))
"""Pauses in the 25 s test recording; from 19.5 s to its end it is silent."""
SILENT_FROM = 19.5


def recording(seconds: float = 25.0) -> np.ndarray:
    """(S, 2) float: a tone per channel with a slow swell, pauses at PAUSES, silence from SILENT_FROM, faint noise."""
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    swell = (1 + 0.5 * np.sin(2 * np.pi * 0.3 * t)) / 1.5
    x = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], axis=1) * swell[:, None]
    for a, b in (*PAUSES, (SILENT_FROM, seconds)):
        x[int(a * SOURCE_RATE) : int(b * SOURCE_RATE)] = 0.0
    return x + 1e-5 * np.random.default_rng(0).standard_normal(x.shape)


def clips_of(folder: Path) -> dict[str, tuple[np.ndarray, int, dict]]:
    """{key: (samples, rate, json with the caption as "txt")} of every shard in ``folder``."""
    out = {}
    for key, f in shard_samples(folder).items():
        audio, rate = soundfile.read(io.BytesIO(f["wav"]), always_2d=True)
        out[key] = audio, rate, {**json.loads(f["json"]), "txt": f.get("txt", b"").decode()}
    return out


def test_shards_audio_cuts_a_48k_stereo_recording_at_its_pauses(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    src.mkdir()
    soundfile.write(src / "long.wav", recording(), SOURCE_RATE, subtype="PCM_16")
    soundfile.write(src / "blip.wav", recording(0.5), SOURCE_RATE, subtype="PCM_16")  # shorter than --min-seconds
    (src / "long.txt").write_text("two tones")
    caplog.set_level("INFO")
    assert main(["shards", "audio", str(src), str(tmp_path / "out"), "--max-seconds", "6", "--min-seconds", "1",
                 "--sample-rate", "16000", "--loudness", "-20"]) == 0
    clips = clips_of(tmp_path / "out")
    spans = sorted((meta["start"], meta["end"]) for _, _, meta in clips.values())
    assert sorted(clips) == [f"{1:08d}-{i:04d}" for i in range(4)]  # file 1 of the sorted list (blip.wav is 0)
    # 4 clips kept, back to back from 0 s; the 5th piece (22-25 s) was silence, dropped and counted
    assert spans[0][0] == 0.0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for start, end in spans:
        assert 1.0 <= end - start <= 6.0
    for cut in (end for _, end in spans):  # every cut lies in a pause or in the silence at the end (no word split)
        assert any(a <= cut <= b for a, b in PAUSES) or cut >= SILENT_FROM
    assert spans[-1][1] < 25.0
    for audio, rate, meta in clips.values():
        assert rate == meta["sample_rate"] == 16000 and audio.shape[1] == 1  # mono at the asked rate
        assert meta["source_rate"] == SOURCE_RATE and meta["channels"] == 2 and meta["path"] == "long.wav"
        assert meta["txt"] == "two tones"  # every clip keeps its file's caption
        assert len(audio) == round((meta["end"] - meta["start"]) * 16000)
        assert abs(level_db(audio[:, 0]) - -20.0) < 0.1  # RMS-levelled (16-bit rounding aside)
    assert "1 clip silent" in caplog.text and "1 too short (blip.wav)" in caplog.text
    assert "4 clips from 1 audio file" in caplog.text


def test_cut_spans_without_pauses_and_short_files() -> None:
    rate = 1000
    noise = np.random.default_rng(1).uniform(0.5, 1.0, 10 * rate).astype(np.float32)
    spans = cut_spans(noise, rate, max_seconds=3.0, min_seconds=0.0)
    assert spans[0][0] == 0 and spans[-1][1] == len(noise) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(1500 <= b - a <= 3000 for a, b in spans[:-1])  # cut between half of max and max: no tiny pieces
    assert cut_spans(noise[:2500], rate, max_seconds=3.0, min_seconds=0.0) == [(0, 2500)]
    assert cut_spans(noise, rate, max_seconds=None, min_seconds=0.0) == [(0, len(noise))]


@pytest.mark.parametrize("kwargs, message", [({"max_seconds": 0}, "--max-seconds: expected > 0"),
                                             ({"max_seconds": 2, "min_seconds": 3}, "--min-seconds 3 is longer"),
                                             ({"loudness": 3}, "--loudness: expected < 0 dBFS")])
def test_clip_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AudioClipOptions(**kwargs)


def test_cutting_refuses_a_truncated_wav_as_whole_file_sharding_does(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A WAV cut off before the end its header promises is skipped and named as truncated, with or without cutting
    (libsndfile reads what is there and says nothing)."""
    src = tmp_path / "src"
    src.mkdir()
    buffer = io.BytesIO()
    soundfile.write(buffer, recording(), SOURCE_RATE, format="WAV", subtype="PCM_16")
    (src / "cut.wav").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    soundfile.write(src / "whole.wav", recording(), SOURCE_RATE, subtype="PCM_16")
    caplog.set_level("INFO")
    for name, options in (("files", []), ("clips", ["--max-seconds", "6"])):
        assert main(["shards", "audio", str(src), str(tmp_path / name), *options]) == 0
        assert "1 skipped: 1 truncated (cut.wav)" in caplog.text, caplog.text
        assert {meta["path"] for _, _, meta in clips_of(tmp_path / name).values()} == {"whole.wav"}
        caplog.clear()
