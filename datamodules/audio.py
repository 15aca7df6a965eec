"""Audio data: procedural note sequences, spoken words, folder sharding and the sample transform.

``synthetic_audio`` draws short melodies whose class is the timbre (``TIMBRES``): notes from a
pentatonic scale (``SCALE_HZ``, A3 to G5), a rhythm of 1-5 notes separated by short rests, an
ADSR envelope (a fast exponential decay for "plucked") and a length that varies per clip, since
variable-length clips are what the packed batches are for. Every sample is seeded with
``default_rng([seed, i])``: sample ``i`` does not depend on ``num`` and re-runs are identical.
Waves are band-limited (additive synthesis below 0.45 * sample_rate), so nothing aliases.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from datamodules.audio_clips import AudioClipOptions, read_audio_clips, read_checked_audio
from datamodules.decoders import BadSample
from datamodules.media.spec import MediaSpec
from datamodules.transforms import SampleTransform
from datamodules.writers import encode_audio, write_media_folder

TIMBRES = ("sine", "square", "sawtooth", "plucked")
SCALE_MIDI = (57, 60, 62, 64, 67, 69, 72, 74, 76, 79)
"""A minor pentatonic, A3 to G5; the lower five notes are the "low" register, the upper five "high"."""
SCALE_HZ = tuple(440.0 * 2.0 ** ((m - 69) / 12) for m in SCALE_MIDI)
NUMBER_WORDS = ("one", "two", "three", "four", "five")
MIN_SLOT = 0.2
"""Shortest time from one note onset to the next (s); a note fills 60-80 % of its slot, then rests."""
FAST_SLOT = 0.3
"""Mean slot (s) below which the caption says "fast"."""
AUDIO_EXTENSIONS = ("wav", "flac")


def harmonic_amplitudes(timbre: str, f0: float, sample_rate: int) -> np.ndarray:
    """(K,) amplitudes of harmonics 1..K of ``f0`` below 0.45 * sample_rate: the timbre's spectrum."""
    k = np.arange(1, max(1, int(0.45 * sample_rate / f0)) + 1)
    if timbre == "sine":
        return (k == 1).astype(np.float64)
    if timbre == "square":
        return np.where(k % 2 == 1, 1.0 / k, 0.0)
    if timbre == "sawtooth":
        return (-1.0) ** (k + 1) / k
    if timbre == "plucked":
        return 1.0 / k**2
    raise ValueError(f"unknown timbre {timbre!r}; expected one of {TIMBRES}")


def envelope(timbre: str, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) amplitude envelope: ADSR with a held sustain, or for "plucked" a fast exponential decay."""
    t = np.arange(n) / sample_rate
    seconds = n / sample_rate
    if timbre == "plucked":
        attack, tau = rng.uniform(0.003, 0.006), rng.uniform(0.02, 0.04)
        env = np.where(t < attack, t / attack, np.exp(-(t - attack) / tau))
        return env * np.clip((seconds - t) / 0.01, 0.0, 1.0)  # 10 ms fade: no click at the end
    attack, decay = rng.uniform(0.005, 0.015), rng.uniform(0.03, 0.06)
    sustain, release = rng.uniform(0.6, 0.85), rng.uniform(0.02, 0.04)
    return np.interp(t, [0.0, attack, attack + decay, seconds - release, seconds], [0.0, 1.0, sustain, sustain, 0.0])


def render_note(timbre: str, f0: float, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) float64 note with peak 1 before the envelope."""
    amplitudes = harmonic_amplitudes(timbre, f0, sample_rate)  # (K,)
    phase = 2 * np.pi * f0 * np.arange(n) / sample_rate  # (n,)
    wave = np.sin(np.outer(phase, np.arange(1, len(amplitudes) + 1))) @ amplitudes  # (n, K) @ (K,)
    return wave / max(np.abs(wave).max(), 1e-9) * envelope(timbre, n, sample_rate, rng)


def synthetic_audio(
    num: int, seed: int = 0, size: int | None = None, sample_rate: int = 8000, min_seconds: float = 0.5, max_seconds: float = 1.5
) -> Iterator[dict]:
    """Yield ``num`` clips ``{"__key__", "wav" (PCM_16 bytes), "cls", "txt", "json"}``; ``cls`` indexes TIMBRES.

    ``size`` is ignored (all synthetic kinds share one signature). Captions read like
    "three fast high square notes"; ``json`` holds the timbre, pitches, onsets and durations.
    """
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"synthetic_audio: need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    if min_seconds < MIN_SLOT + 0.03:
        raise ValueError(f"synthetic_audio: min_seconds={min_seconds} must be at least {MIN_SLOT + 0.03} (one note)")
    if SCALE_HZ[-1] * 3 > sample_rate / 2:
        raise ValueError(f"synthetic_audio: sample_rate={sample_rate} too low; needs > {6 * SCALE_HZ[-1]:.0f} Hz for 3 harmonics")
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(len(TIMBRES)))
        timbre = TIMBRES[label]
        seconds = float(rng.uniform(min_seconds, max_seconds))
        lead = float(rng.uniform(0.0, 0.03))
        usable = seconds - lead
        count = int(rng.integers(1, min(len(NUMBER_WORDS), int(usable / MIN_SLOT)) + 1))
        slots = MIN_SLOT + (usable - MIN_SLOT * count) * rng.dirichlet(np.ones(count))  # (count,) s
        onsets = lead + np.concatenate([[0.0], np.cumsum(slots)[:-1]])
        durations = slots * rng.uniform(0.6, 0.8, count)
        register = "high" if rng.random() < 0.5 else "low"
        choices = SCALE_HZ[5:] if register == "high" else SCALE_HZ[:5]
        pitches = np.asarray(choices)[rng.integers(len(choices), size=count)]
        wave = np.zeros(round(seconds * sample_rate))
        for onset, duration, f0 in zip(onsets, durations, pitches):
            start, n = round(onset * sample_rate), round(duration * sample_rate)
            n = min(n, len(wave) - start)
            wave[start : start + n] = render_note(timbre, float(f0), n, sample_rate, rng)
        wave *= rng.uniform(0.3, 0.9)
        tempo = "fast" if slots.mean() < FAST_SLOT else "slow"
        yield {
            "__key__": f"{i:08d}",
            "wav": encode_audio(wave, sample_rate),
            "cls": label,
            "txt": f"{NUMBER_WORDS[count - 1]} {tempo} {register} {timbre} note{'s' if count > 1 else ''}",
            "json": {
                "timbre": timbre,
                "pitches_hz": [round(float(p), 2) for p in pitches],
                "onsets_s": [round(float(o), 4) for o in onsets],
                "durations_s": [round(float(d), 4) for d in durations],
                "seconds": round(len(wave) / sample_rate, 4),
                "sample_rate": sample_rate,
            },
        }


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def spoken_words(
    num: int, seed: int = 0, size: int | None = None, sample_rate: int = 8000, words: tuple[str, ...] = DIGIT_WORDS
) -> Iterator[dict]:
    """Spoken ``words`` synthesised by the ``espeak-ng`` binary; ``cls`` indexes ``words``.

    Voice, speed and pitch vary per sample. Raises at call time (not on first iteration) when
    espeak-ng is missing, so a request for this data never quietly yields nothing.
    """
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise FileNotFoundError("spoken_words: the espeak-ng binary is not on PATH; install it (e.g. apt-get install espeak-ng)")

    def generate() -> Iterator[dict]:
        for i in range(num):
            rng = np.random.default_rng([seed, i])
            label = int(rng.integers(len(words)))
            speed, pitch = int(rng.integers(120, 220)), int(rng.integers(20, 80))
            voice = ("en", "en+f3", "en+m3")[int(rng.integers(3))]
            result = subprocess.run(
                [binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", words[label]],
                capture_output=True, check=True,
            )
            audio, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
            wave = AF.resample(torch.from_numpy(audio), rate, sample_rate).numpy() if rate != sample_rate else audio
            pace, register = "fast" if speed > 170 else "slowly", "high" if pitch > 50 else "low"
            yield {
                "__key__": f"{i:08d}",
                "wav": encode_audio(wave, sample_rate),
                "cls": label,
                "txt": f"the word {words[label]} spoken {pace} in a {register} voice",
                "json": {"word": words[label], "voice": voice, "speed": speed, "pitch": pitch, "sample_rate": sample_rate},
            }

    return generate()


def read_audio(path: Path) -> dict:
    """An audio file's original bytes under its extension, after one full decode and the checks of ``read_checked_audio``."""
    data, audio, sample_rate = read_checked_audio(path)
    return {path.suffix[1:].lower(): data, "json": {"sample_rate": sample_rate, "seconds": round(len(audio) / sample_rate, 4)}}


def write_audio_folder(
    src: str, out: str, shard_size: int = 1000, prefix: str = "audio", progress: bool = True, captions: str | None = None,
    holdout: float = 0.0, clips: AudioClipOptions | None = None, workers: int = 1,
) -> list[str]:
    """Shard an audio folder (``src/[<class>/]<name>.{wav,flac}``, see ``datamodules.sources``); the shard paths.

    Each file is decoded once here (not only its header), so that a broken one is skipped and named now.
    Without ``clips`` (or with its defaults) each file is one sample stored as its original bytes (not
    re-encoded); with them, recordings are cut, made mono, resampled and levelled (``datamodules.audio_clips``).
    """
    if clips is None or clips == AudioClipOptions():
        read, unit, source = read_audio, "audio file", None
    else:
        read, unit, source = functools.partial(read_audio_clips, options=clips), "clip", "audio file"
    return write_media_folder(src, out, read, AUDIO_EXTENSIONS, unit, "readable audio files", captions=captions,
                              holdout=holdout, shard_size=shard_size, prefix=prefix, progress=progress,
                              source=source, workers=workers).paths


class AudioTransform(SampleTransform):
    """Decoded audio -> ``x`` float32 (samples,) mono in [-1, 1] at ``sample_rate``.

    Channels are averaged. Clips longer than ``max_seconds`` are truncated to their first
    ``max_seconds`` (cut before resampling, so long files cost little); clips shorter than
    ``min_seconds``, non-finite audio and arrays that are not (T, C) are BadSamples.

    Args:
        sample_rate: Output sample rate; other rates are resampled (torchaudio, sinc interpolation).
            None: the model's (8000 alone).
        max_seconds: Longer clips keep their first max_seconds.
        min_seconds: Shorter clips are skipped.
        audio_key: Comma-separated sample fields to look for, first match wins; each holds what
            ``decoders.decode_audio`` returns, ``((T, C) float32, sample_rate)``.
    """

    def __init__(self, sample_rate: int | None = None, max_seconds: float = 10.0, min_seconds: float = 0.1,
                 audio_key: str = "wav,flac"):
        if sample_rate is not None and sample_rate <= 0:
            raise ValueError(f"AudioTransform: sample_rate must be positive, got {sample_rate}")
        if not 0 <= min_seconds <= max_seconds:
            raise ValueError(f"AudioTransform: need 0 <= min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
        self.stated = {"sample_rate": sample_rate}
        self.max_seconds, self.min_seconds = max_seconds, min_seconds
        self.audio_keys = tuple(k.strip() for k in audio_key.split(",") if k.strip())
        self.follow(MediaSpec())  # alone: one token per sample

    def follow(self, spec: MediaSpec) -> None:
        super().follow(spec)
        self.sample_rate = self.option("sample_rate", self.stated["sample_rate"], spec.sample_rate, 8000)

    def cost(self, sample: dict) -> int:
        return self.spec.audio_tokens(len(sample["x"]))

    def __call__(self, decoded: dict) -> dict:
        field, value = self.first_present(decoded, self.audio_keys)
        where = f"{self.where(decoded)}: {field}"
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray)):
            raise BadSample(f"{where}: expected decoded audio ((T, C) array, sample_rate), got {type(value).__name__}")
        audio, rate = value
        if audio.ndim != 2 or audio.shape[1] == 0 or not np.issubdtype(audio.dtype, np.floating) or int(rate) <= 0:
            raise BadSample(f"{where}: expected a float (T, C) array at a positive rate, got {audio.dtype} {audio.shape} at {rate} Hz")
        audio = audio[: int(self.max_seconds * rate)]
        if not np.isfinite(audio).all():
            raise BadSample(f"{where}: audio holds NaN or inf")
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).mean(dim=1)  # (T,)
        if int(rate) != self.sample_rate:
            x = AF.resample(x, int(rate), self.sample_rate)
        x = x[: int(self.max_seconds * self.sample_rate)]
        if len(x) < self.min_seconds * self.sample_rate or len(x) == 0:
            raise BadSample(f"{where}: {len(x) / self.sample_rate:.3f} s is shorter than min_seconds={self.min_seconds}")
        return {"x": x.clamp(-1.0, 1.0).contiguous(), **self.conditioning(decoded)}
