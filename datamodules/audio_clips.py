"""Long recordings -> clips: ``duoflow shards audio --max-seconds S`` (and --sample-rate, --loudness).

One file is decoded whole (soundfile), its channels averaged to mono and resampled to the target
rate (torchaudio's sinc kernel, built once per rate pair), then cut:

- Cuts (silence-aware, cheap): while more than ``max_seconds`` remain after the current start, the
  next cut is the middle of the quietest 20 ms frame (mean square, numpy) between
  ``max(min_seconds, max_seconds / 2)`` and ``max_seconds`` after the start (the latest of the
  frames within 3 dB of the quietest), so a pause in that window ends the clip; without a pause it
  is simply the quietest spot. A last piece shorter than ``min_seconds`` is dropped.
- Silent clips (RMS below ``silence_db`` dBFS) are dropped and counted.
- Loudness (optional): each clip's RMS level is set to ``loudness`` dBFS (plain RMS over the clip,
  not LUFS: no K-weighting or gating, which speech and music at one target level do not need for
  training data; pyloudnorm is not worth a dependency here), then scaled down if its peak would
  pass 0.999 (so a very peaky clip can end quieter than the target; its ``gain_db`` says what was done).

Each clip is stored as 16-bit PCM mono WAV with ``json``: the source path (relative to SRC), its
``start``/``end`` in seconds of the source, ``sample_rate``, the source's ``source_rate`` and
``channels``, and ``gain_db`` when normalised. Keys: ``<file index>-<clip index>``, the clip index
counting every cut piece (dropped ones too), so keys do not move when a threshold changes.
Letters: S samples, K channels, F energy frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from datamodules.decoders import decode_audio
from datamodules.sources import Skipped
from datamodules.writers import Cut

FRAME_SECONDS = 0.02
"""Energy frame used to find quiet cut points."""
QUIET_RATIO = 2.0
"""Frames within this energy ratio (3 dB) of the window's quietest count as equally quiet: the latest is cut, so
a pause with a little noise ends the clip at its end, not at a random frame of it."""


@dataclass(frozen=True)
class AudioClipOptions:
    """How ``shards audio`` cuts and levels recordings (its --max-seconds, --min-seconds, ... options)."""

    max_seconds: float | None = None
    """Longest clip; longer recordings are cut. None: one clip per file, never cut."""
    min_seconds: float = 0.0
    """Shorter clips (and files) are dropped."""
    sample_rate: int | None = None
    """Rate of the stored clips; None: each file's own."""
    loudness: float | None = None
    """Target RMS level of each clip in dBFS (e.g. -20); None: levels kept."""
    silence_db: float = -60.0
    """Clips whose RMS level is below this (dBFS) are dropped as silent."""

    def __post_init__(self) -> None:
        checks = {"max_seconds": self.max_seconds is None or self.max_seconds > 0, "min_seconds": self.min_seconds >= 0,
                  "sample_rate": self.sample_rate is None or self.sample_rate >= 1,
                  "loudness": self.loudness is None or self.loudness < 0}
        wanted = {"max_seconds": "> 0", "min_seconds": ">= 0", "sample_rate": ">= 1 Hz", "loudness": "< 0 dBFS"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}: expected {wanted[name]}, got {getattr(self, name)}")
        if self.max_seconds is not None and self.min_seconds > self.max_seconds:
            raise ValueError(f"--min-seconds {self.min_seconds} is longer than --max-seconds {self.max_seconds}")


def level_db(x: np.ndarray) -> float:
    """RMS level in dBFS (a full-scale sine is -3 dB); -inf for digital silence."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20 * np.log10(rms) if rms > 0 else -np.inf


def cut_spans(x: np.ndarray, rate: int, max_seconds: float | None, min_seconds: float) -> list[tuple[int, int]]:
    """(start, end) sample spans covering ``x`` (S,), each at most max_seconds, cut at quiet frames (module docstring)."""
    if max_seconds is None or len(x) <= max_seconds * rate:
        return [(0, len(x))]
    frame = max(1, round(FRAME_SECONDS * rate))
    count = len(x) // frame
    energy = np.square(x[: count * frame].reshape(count, frame), dtype=np.float64).mean(axis=1)  # (F,)
    longest, shortest = int(max_seconds * rate), int(max(min_seconds, max_seconds / 2) * rate)
    spans, start = [], 0
    while len(x) - start > longest:
        lo, hi = -(-(start + shortest) // frame), (start + longest) // frame  # frames wholly inside the window
        if hi > lo:
            window = energy[lo:hi]
            quiet = np.flatnonzero(window <= QUIET_RATIO * window.min() + 1e-12)  # as quiet as the quietest, within 3 dB
            cut = (lo + int(quiet[-1])) * frame + frame // 2  # the latest such frame's middle: the end of a pause
        else:
            cut = start + longest
        spans.append((start, cut))
        start = cut
    return spans + [(start, len(x))]


def mono_at(audio: np.ndarray, rate: int, target: int | None) -> tuple[np.ndarray, int]:
    """(S, K) float -> ((S',) float32 mono at ``target`` (None: ``rate``), that rate)."""
    x = audio.mean(axis=1, dtype=np.float32) if audio.ndim == 2 else audio.astype(np.float32)
    if target is None or target == rate:
        return x, rate
    import torch

    from datamodules.video_clips import resampler  # one cached kernel per rate pair

    with torch.no_grad():
        return resampler(rate, target)(torch.from_numpy(x)).numpy(), target


def wav_shortfall(data: bytes) -> int:
    """How many bytes of its data chunk a RIFF/WAVE file lacks (0: whole, or not a RIFF layout this reads)."""
    offset = 12
    while data[:4] == b"RIFF" and offset + 8 <= len(data):
        kind, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if kind == b"data":
            return max(0, offset + 8 + size - len(data)) if size != 0xFFFFFFFF else 0  # 0xFFFFFFFF: a streamed WAV
        offset += 8 + size + size % 2
    return 0


def read_checked_audio(path: Path) -> tuple[bytes, np.ndarray, int]:
    """(file bytes, samples (S, K) float32, sample rate) of a WAV/FLAC file, refused when it cannot be decoded, holds
    no samples, or is a WAV cut off before the end its header promises: the checks of every audio reader."""
    data = path.read_bytes()
    try:
        audio, sample_rate = decode_audio(data)
    except soundfile.LibsndfileError as exn:
        raise ValueError(f"not WAV/FLAC audio: {exn.error_string}") from exn
    if not len(audio):
        raise Skipped("unreadable", "no samples")
    missing = wav_shortfall(data) if path.suffix.lower() == ".wav" else 0
    if missing:  # libsndfile reads what is there and says nothing: a cut-off copy would pass as a short recording
        raise Skipped("truncated", f"{missing} bytes of samples missing at the end (the header promises more)")
    return data, audio, sample_rate


def read_audio_clips(path: Path, options: AudioClipOptions) -> Cut:
    """A recording's clips as shard fields (``wav``, ``json``), and the clips dropped per reason; raises ``Skipped``
    when none is left (too short, silent) or the file fails ``read_checked_audio``."""
    _, audio, source_rate = read_checked_audio(path)  # (S, K)
    if not np.isfinite(audio).all():
        raise Skipped("unreadable", "audio holds NaN or inf")
    x, rate = mono_at(audio, source_rate, options.sample_rate)
    clips, dropped = [], {}
    for index, (a, b) in enumerate(cut_spans(x, rate, options.max_seconds, options.min_seconds)):
        clip = x[a:b]
        level = level_db(clip)
        reason = ("shorter than --min-seconds" if b - a < options.min_seconds * rate or b == a
                  else "silent" if level < options.silence_db else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        meta = {"start": round(a / rate, 6), "end": round(b / rate, 6), "sample_rate": rate, "source_rate": source_rate,
                "channels": audio.shape[1]}
        if options.loudness is not None:
            gain = min(10 ** ((options.loudness - level) / 20), 0.999 / max(float(np.abs(clip).max()), 1e-12))
            clip, meta["gain_db"] = clip * gain, round(20 * np.log10(gain), 3)
        clips.append((index, {"wav": (clip, rate), "json": meta}))  # the writer: clipped to [-1, 1], 16-bit PCM WAV
    if not clips:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        raise Skipped("too short" if "shorter than --min-seconds" in dropped else "silent", f"no clip kept ({reasons})")
    return Cut(clips, dropped)
