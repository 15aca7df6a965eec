"""Audio pieces: synthetic notes, folder shards, the transform, the mel codec, tokenizer, files, checker."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from app.evaluation.checkers.audio import audio_attributes, audio_scores
from datamodules import audio as audio_data
from datamodules.audio import SCALE_HZ, TIMBRES, AudioTransform, spoken_words, synthetic_audio, write_audio_folder
from datamodules.decoders import BadSample, decode_audio, decode_sample
from datamodules.media.audio import save_audio
from datamodules.writers import ShardWriter
from models.codecs.mel import MelCodec
from models.tokenizers.audio import AudioFrames

SR = 8000


def wav_bytes(wave: np.ndarray, sample_rate: int, format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, sample_rate, format=format)
    return buffer.getvalue()


def tone(freq: float, seconds: float, sample_rate: int = SR, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * sample_rate)) / sample_rate)).astype(np.float32)


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return list(synthetic_audio(64, seed=1))


def waves_of(samples: list[dict]) -> list[np.ndarray]:
    return [decode_audio(s["wav"])[0][:, 0] for s in samples]


# ---------------------------------------------------------------- synthetic data


def test_synthetic_audio_deterministic_and_independent_of_num():
    first = list(synthetic_audio(4, seed=3))
    assert first == list(synthetic_audio(9, seed=3))[:4]
    assert [s["wav"] for s in first] != [s["wav"] for s in synthetic_audio(4, seed=4)]


def test_synthetic_audio_lengths_vary_and_metadata_matches(clips):
    seconds = []
    for sample in clips:
        wave, rate = decode_audio(sample["wav"])
        meta = sample["json"]
        assert rate == SR == meta["sample_rate"] and wave.shape[1] == 1 and np.abs(wave).max() <= 1.0
        assert 0.5 <= len(wave) / SR <= 1.5 and meta["seconds"] == pytest.approx(len(wave) / SR, abs=1e-3)
        count = len(meta["pitches_hz"])
        assert count == len(meta["onsets_s"]) == len(meta["durations_s"]) >= 1
        assert sample["txt"].split()[0] == audio_data.NUMBER_WORDS[count - 1] and meta["timbre"] in sample["txt"]
        assert TIMBRES[sample["cls"]] == meta["timbre"]
        assert all(min(abs(p - s) for s in SCALE_HZ) < 0.01 for p in meta["pitches_hz"])
        ends = np.add(meta["onsets_s"], meta["durations_s"])
        assert np.all(ends <= meta["seconds"]) and np.all(np.diff(meta["onsets_s"]) >= audio_data.MIN_SLOT - 1e-3)
        seconds.append(len(wave) / SR)
    assert np.std(seconds) > 0.15  # lengths really vary: that is what packing is for
    assert {s["cls"] for s in clips} == set(range(len(TIMBRES)))
    short = [len(decode_audio(s["wav"])[0]) / 16000 for s in synthetic_audio(8, sample_rate=16000, min_seconds=0.3, max_seconds=0.4)]
    assert all(0.3 <= s <= 0.4 for s in short)
    with pytest.raises(ValueError, match="min_seconds"):
        next(synthetic_audio(1, min_seconds=0.1))


def test_wav_bytes_round_trip_through_shard_writer(tmp_path, clips):
    with ShardWriter(str(tmp_path / "audio-%06d.tar")) as writer:
        for sample in clips[:3]:
            writer.write(sample)
    stored = read_tar(writer.paths[0])
    for sample in clips[:3]:
        raw = stored[sample["__key__"]]
        assert raw["wav"] == sample["wav"] and json.loads(raw["json"]) == sample["json"]
        decoded = decode_sample({"__key__": sample["__key__"], **raw})
        wave, rate = decoded["wav"]
        assert rate == SR and wave.dtype == np.float32 and decoded["cls"] == sample["cls"] and decoded["txt"] == sample["txt"]
    # a float (T,) array plus its rate is written as 16-bit WAV by the writer and reads back within one step
    wave = tone(440, 0.25)
    with ShardWriter(str(tmp_path / "float-%06d.tar")) as writer:
        writer.write({"__key__": "a", "wav": (wave, SR)})
    back, rate = decode_audio(read_tar(writer.paths[0])["a"]["wav"])
    assert rate == SR and np.abs(back[:, 0] - wave).max() < 2 / 2**15


def test_spoken_words_names_missing_binary(monkeypatch):
    monkeypatch.setattr(audio_data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="espeak-ng"):
        spoken_words(3)  # raises at the call, not at the first next()


# ---------------------------------------------------------------- folder writer


def test_write_audio_folder_round_trip(tmp_path, caplog):
    src = tmp_path / "src"
    files = {"dog/a.wav": wav_bytes(tone(440, 0.3), SR), "dog/b.flac": wav_bytes(tone(330, 0.2), 16000, "FLAC"),
             "cat/c.wav": wav_bytes(tone(220, 0.4), SR), "cat/broken.wav": b"RIFF not audio"}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "dog/a.txt").write_text("a dog tone\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        paths = write_audio_folder(str(src), str(out), shard_size=2, progress=False)
    assert "cat/broken.wav" in caplog.text
    assert len(paths) == 2 and json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    assert sum(json.loads((out / "index.json").read_text())["shards"].values()) == 3
    seen = {}
    for path in paths:
        for key, raw in read_tar(path).items():
            meta = json.loads(raw["json"])
            ext = meta["path"].rsplit(".", 1)[1]
            assert raw[ext] == files[meta["path"]]  # original bytes, not re-encoded
            assert int(raw["cls"]) == ["cat", "dog"].index(meta["class"]) == ["cat", "dog"].index(meta["path"].split("/")[0])
            seen[meta["path"]] = raw.get("txt", b"").decode()
    assert seen == {"dog/a.wav": "a dog tone", "dog/b.flac": "", "cat/c.wav": ""}

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.wav").write_bytes(files["dog/a.wav"])
    (paths_flat,) = write_audio_folder(str(flat), str(tmp_path / "out-flat"), progress=False)
    (raw,) = read_tar(paths_flat).values()
    assert "cls" not in raw and raw["wav"] == files["dog/a.wav"] and not (tmp_path / "out-flat/classes.json").exists()
    with pytest.raises(FileNotFoundError, match="missing"):
        write_audio_folder(str(tmp_path / "missing"), str(out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable audio"):
        write_audio_folder(str(tmp_path / "empty"), str(out))


# ---------------------------------------------------------------- transform


def test_audio_transform_mono_resample_truncate():
    stereo = np.stack([tone(1000, 0.5, 16000), tone(1000, 0.5, 16000)], axis=1)  # (T, 2) at 16 kHz
    out = AudioTransform(sample_rate=SR)({"__key__": "k", "flac": (stereo, 16000), "cls": 2, "txt": "hi"})
    x = out["x"]
    assert x.dtype == torch.float32 and x.shape == (4000,) and x.abs().max() <= 1.0
    assert (out["cls"], out["txt"], out["__key__"]) == (2, "hi", "k")
    spectrum = torch.fft.rfft(x * torch.hann_window(len(x))).abs()
    assert abs(int(spectrum.argmax()) * SR / len(x) - 1000) <= 2  # the tone keeps its pitch
    long = AudioTransform(sample_rate=SR, max_seconds=0.2)({"wav": (tone(440, 1.0)[:, None], SR)})
    assert long["x"].shape == (1600,) and torch.allclose(long["x"], torch.from_numpy(tone(440, 0.2)))
    assert long["cls"] == -1 and long["txt"] == ""


@pytest.mark.parametrize(
    "value, message",
    [
        ((np.zeros((100, 1), np.float32), SR), "shorter than min_seconds"),
        ((np.full((4000, 1), np.nan, np.float32), SR), "NaN"),
        ((np.zeros(4000, np.float32), SR), r"\(T, C\)"),
        ("not audio", "expected decoded audio"),
    ],
)
def test_audio_transform_bad_samples(value, message):
    with pytest.raises(BadSample, match=rf"shard-7\.tar:00000042: wav: .*{message}"):
        AudioTransform()({"__url__": "shard-7.tar", "__key__": "00000042", "wav": value})


def test_audio_transform_missing_field():
    with pytest.raises(BadSample, match="expected one of"):
        AudioTransform()({"__url__": "s.tar", "__key__": "1", "png": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match="min_seconds"):
        AudioTransform(min_seconds=2.0, max_seconds=1.0)


# ---------------------------------------------------------------- mel codec


def test_mel_codec_shapes_silence_and_no_state():
    codec = MelCodec()
    assert codec.state_dict() == {} and not list(codec.parameters())
    mel = codec.encode(torch.zeros(2, 1000))
    assert mel.shape == (2, 40, codec.frames(1000)) and torch.isfinite(mel).all() and torch.all(mel == -1.0)
    assert codec.samples(codec.frames(1000)) == 1000 // 128 * 128
    loud = codec.encode(torch.from_numpy(tone(440, 0.5, amplitude=1.0))[None])
    assert 0.9 < loud.max() < 1.1  # the documented normalisation: a full-scale tone near +1
    assert torch.equal(codec.decode(loud), codec.decode(loud))  # Griffin-Lim from zero phase: deterministic


@pytest.mark.parametrize("freq", [261.63, 440.0, 659.26])
def test_mel_codec_round_trip_keeps_pitch_and_duration(freq):
    codec = MelCodec()
    x = torch.from_numpy(tone(freq, 1.0))[None]
    y = codec.decode(codec.encode(x))
    assert abs(y.shape[-1] - x.shape[-1]) <= codec.hop
    frames = y[0, : y.shape[-1] // codec.n_fft * codec.n_fft].reshape(-1, codec.n_fft)  # (frames, n_fft)
    spectrum = torch.fft.rfft(frames * torch.hann_window(codec.n_fft), dim=-1).abs().mean(0)
    assert abs(int(spectrum.argmax()) - round(freq * codec.n_fft / SR)) <= 1  # dominant bin within one bin


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("frames", [64, 10])
def test_audio_frames_round_trip(frames):
    tok = AudioFrames(channels=40, frames=64, patch=2)
    x = torch.randn(1 if frames != 64 else 3, 40, frames)
    tokens, pos = tok.tokenize(x)
    assert tokens.shape == (x.shape[0], frames // 2, 80) and tok.token_dim == 80
    assert pos.shape == (x.shape[0], frames // 2, tok.rope_axes) and torch.equal(pos[0, :, 0], torch.arange(frames // 2).float())
    assert torch.equal(tok.untokenize(tokens, x.shape), x)
    assert torch.equal(tokens[0, 1], x[0, :, 2:4].reshape(-1))  # token n = frames (n p .. n p + p), channel-major
    assert tok.num_tokens() == 32 and tok.num_tokens(frames) == frames // 2 and tok.latent_shape() == (40, 64)


def test_audio_frames_rejects_partial_patches():
    with pytest.raises(ValueError, match="multiple of patch"):
        AudioFrames(frames=63)
    with pytest.raises(ValueError, match="multiple of patch"):
        AudioFrames().tokenize(torch.zeros(1, 40, 7))


# ---------------------------------------------------------------- media


def test_save_audio_writes_wavs_and_preview(tmp_path):
    paths = save_audio(torch.rand(2, 1200) * 2 - 1, tmp_path / "batch", sample_rate=SR)
    assert [p.suffix for p in paths] == [".wav", ".wav", ".png"]
    ragged = [torch.from_numpy(tone(440, 0.3)), torch.from_numpy(tone(660, 0.5)), torch.zeros(900)]
    paths = save_audio(ragged, tmp_path / "ragged", sample_rate=SR, prefix="s")
    for path, wave in zip(paths, ragged):
        info = soundfile.info(str(path))
        assert info.samplerate == SR and info.frames == len(wave) and info.subtype == "PCM_16"
    with Image.open(paths[-1]) as preview:
        assert paths[-1].name == "s-spectrograms.png" and preview.width > MelCodec().frames(4000)
    with pytest.raises(ValueError, match="1-D"):
        save_audio([torch.zeros(2, 10)], tmp_path, sample_rate=SR)


# ---------------------------------------------------------------- checker


def test_checker_reads_synthetic_attributes_back(clips):
    waves = waves_of(clips)
    labels = [s["cls"] for s in clips]
    counts = [len(s["json"]["onsets_s"]) for s in clips]
    scores = audio_scores(waves, labels, SR, note_counts=counts)
    assert scores["timbre_accuracy"] >= 0.9 and scores["pitch_in_scale"] >= 0.95
    assert scores["voiced_clips"] == 1.0 and scores["onset_count_error"] <= 0.2
    for sample, found in zip(clips[:16], audio_attributes(waves[:16], SR)):
        meta = sample["json"]
        if len(found["onsets_s"]) == len(meta["onsets_s"]):
            assert np.allclose(found["onsets_s"], meta["onsets_s"], atol=0.02)
        if len(found["pitches_hz"]) == len(meta["pitches_hz"]):
            cents = 1200 * np.abs(np.log2(np.divide(found["pitches_hz"], meta["pitches_hz"])))
            assert cents.max() < 20


def test_checker_scores_noise_and_silence_low():
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-0.5, 0.5, SR) for _ in range(6)] + [rng.normal(0, 0.1, SR // 2) for _ in range(6)]
    waves += [np.zeros(SR), np.zeros(10)]
    labels = [i % len(TIMBRES) for i in range(len(waves))]
    scores = audio_scores(waves, labels, SR)
    assert scores["timbre_accuracy"] <= 0.1 and scores["pitch_in_scale"] == 0.0 and scores["voiced_clips"] <= 0.1
    with pytest.raises(ValueError, match="labels"):
        audio_scores(waves, labels[:-1], SR)


def test_checker_survives_mel_griffin_lim(clips):
    """Timbre stays readable after encode -> decode (64 clips: about 0.97; clean: 1.0)."""
    sample = clips[:16]
    waves = waves_of(sample)
    codec = MelCodec()
    batch = torch.zeros(len(waves), max(map(len, waves)))
    for i, wave in enumerate(waves):
        batch[i, : len(wave)] = torch.from_numpy(wave)
    decoded = codec.decode(codec.encode(batch))
    rebuilt = [decoded[i, : len(w)].numpy() for i, w in enumerate(waves)]
    scores = audio_scores(rebuilt, [s["cls"] for s in sample], SR, note_counts=[len(s["json"]["onsets_s"]) for s in sample])
    assert scores["timbre_accuracy"] >= 0.75 and scores["pitch_in_scale"] >= 0.6 and scores["onset_count_error"] <= 0.5


def test_shards_audio_command(tmp_path, capsys):
    from app.__main__ import main

    src = tmp_path / "src"
    src.mkdir()
    for name, freq in (("a", 440), ("b", 660)):
        (src / f"{name}.wav").write_bytes(wav_bytes(tone(freq, 0.3), SR))
    (src / "a.txt").write_text("a tone")
    assert main(["shards", "audio", str(src), str(tmp_path / "out"), "--shard-size", "1"]) == 0
    samples = {k: v for path in sorted((tmp_path / "out").glob("audio-*.tar")) for k, v in read_tar(str(path)).items()}
    assert len(samples) == 2 and sorted(s.get("txt", b"").decode() for s in samples.values()) == ["", "a tone"]
    with pytest.raises(SystemExit):
        main(["shards", "audio", "--help"])
    assert "WAV/FLAC" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")
def test_synthetic_speech_kind_writes_spoken_digits(tmp_path):
    """`shards synthetic speech`: espeak-ng words as WAV with the digit as class and a caption."""
    import webdataset as wds

    from datamodules.audio import DIGIT_WORDS
    from datamodules.synthetic import write_synthetic

    paths = write_synthetic("speech", str(tmp_path), 4, progress=False)
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert len(samples) == 4
    for s in samples:
        wave, rate = soundfile.read(io.BytesIO(s["wav"]))
        label = int(s["cls"])
        assert rate == 8000 and 0.1 < len(wave) / rate < 3.0 and np.abs(wave).max() > 0.05
        assert DIGIT_WORDS[label] in s["txt"].decode()
