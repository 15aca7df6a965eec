"""Read the procedural attributes of synthetic note clips back, without learning.

A generated clip is scored by how well these measurements recover what the synthetic data
(``datamodules.audio.synthetic_audio``) put in. Clips are 1-D float waves in [-1, 1].
All levels are relative to the clip's own loudest frame, so the gain of a clip does not matter.

Per clip:
    envelope     frame energy in dB, 10 ms windows every 5 ms.
    onsets       frames where the energy has risen by RISE_DB or more over the previous 25 ms,
                 reaches within ACTIVE_DB of the clip's peak and lies above SILENCE_DB (absolute);
                 runs of such frames count once, and onsets closer than MIN_GAP_S are merged.
                 The clip start counts as silence, so a note at t=0 is an onset.
Per note (from one onset to the next):
    region       from the note's peak (within 60 ms of its onset) to the last frame within
                 ACTIVE_DB of that peak; shorter than MIN_REGION_S -> unvoiced.
    pitch        autocorrelation of the region (normalised, unbiased) over 100-1000 Hz; the
                 smallest lag whose peak reaches 0.85 of the best (no octave-down errors); a best
                 peak under VOICING -> unvoiced (noise is unvoiced). The lag's frequency is refined
                 to the interpolated peak of the zero-padded Hann spectrum within +-6 %.
    harmonics    amplitude in bands of +-f0/4 around f0, 2 f0, 3 f0: ``even`` = a2/a1 and
                 ``odd`` = a3/a1 (sine ~ (0, 0), square (0, 1/3), sawtooth (1/2, 1/3)).
    decay_db     energy drop from the note's peak to 60 ms later. Plucked notes drop 13-26 dB,
                 sustained ADSR notes under 5 dB (after MelCodec + Griffin-Lim: >= 11 and
                 mostly <= 9 dB), hence DECAY_DB = 10.
Per clip, from the medians over voiced notes: ``timbre`` = "plucked" when decay_db >= DECAY_DB,
else the nearest of the sine/square/sawtooth prototypes in (even, odd); None without voiced notes.

``audio_scores`` averages over clips: ``timbre_accuracy`` (timbre == label), ``pitch_in_scale``
(fraction of voiced notes within 50 cents of a SCALE_HZ pitch, 0 without any), ``voiced_clips``
(fraction of clips with a voiced note) and, given the true note counts, ``onset_count_error``
(mean absolute difference of detected and true note counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from datamodules.audio import SCALE_HZ, TIMBRES

HOP_S = 0.005
RISE_DB = 10.0
ACTIVE_DB = 30.0
SILENCE_DB = -60.0
MIN_GAP_S = 0.08
MIN_REGION_S = 0.04
VOICING = 0.5
DECAY_DB = 10.0
F0_RANGE = (100.0, 1000.0)
PROTOTYPES = {"sine": (0.0, 0.0), "square": (0.0, 1 / 3), "sawtooth": (0.5, 1 / 3)}
"""Harmonic (even, odd) amplitude ratios of the sustained timbres."""


def energy_db(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames,) energy in dB of 2-hop windows centred every hop (frame i at sample i * hop)."""
    hop = max(1, round(HOP_S * sample_rate))
    padded = np.pad(wave.astype(np.float64), (hop, hop))
    frames = sliding_window_view(padded, 2 * hop)[::hop][: len(wave) // hop + 1]  # (frames, 2 hop)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


def detect_onsets(env: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset frame indices of an energy envelope (see the module docstring)."""
    span = max(1, round(0.025 / HOP_S))
    before = np.concatenate([np.full(span, -120.0), env[:-1]])  # silence before the clip
    previous_min = sliding_window_view(before, span).min(axis=1)[: len(env)]  # min over the 25 ms before
    candidate = (env - previous_min >= RISE_DB) & (env >= env.max() - ACTIVE_DB) & (env >= SILENCE_DB)
    starts = np.flatnonzero(candidate & ~np.concatenate([[False], candidate[:-1]]))
    onsets: list[int] = []
    for frame in starts:
        if not onsets or (frame - onsets[-1]) * HOP_S >= MIN_GAP_S:
            onsets.append(int(frame))
    return np.asarray(onsets, dtype=np.int64)


def estimate_f0(region: np.ndarray, sample_rate: int) -> float | None:
    """Fundamental (Hz) of a note region by autocorrelation refined on the spectrum; None if unvoiced."""
    n = len(region)
    x = region - region.mean()
    size = 1 << int(np.ceil(np.log2(2 * n)))
    r = np.fft.irfft(np.abs(np.fft.rfft(x, size)) ** 2, size)[:n]
    if r[0] <= 0:
        return None
    lags = np.arange(n)
    r = r / r[0] * n / np.maximum(n - lags, 1)  # normalised, unbiased
    low, high = int(sample_rate / F0_RANGE[1]), min(int(sample_rate / F0_RANGE[0]), n // 2)
    if high <= low + 2:
        return None
    inner = np.arange(low + 1, high)
    peaks = inner[(r[inner] > r[inner - 1]) & (r[inner] >= r[inner + 1])]
    if len(peaks) == 0 or r[peaks].max() < VOICING:
        return None
    lag = int(peaks[np.argmax(r[peaks] >= 0.85 * r[peaks].max())])  # first near-best peak
    a, b, c = r[lag - 1], r[lag], r[lag + 1]
    lag_f = lag + 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else float(lag)
    f0 = sample_rate / lag_f
    freqs, spectrum = note_spectrum(region, sample_rate)
    near = np.flatnonzero(np.abs(freqs - f0) <= 0.06 * f0)
    k = int(near[np.argmax(spectrum[near])])
    if 0 < k < len(spectrum) - 1:  # parabolic peak on the log magnitude
        a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
        offset = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0
        return float(freqs[k] + offset * (freqs[1] - freqs[0]))
    return float(freqs[k])


def note_spectrum(region: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(freqs, |X|) of the Hann-windowed region zero-padded to at least 2^15 points."""
    size = max(1 << 15, 1 << int(np.ceil(np.log2(len(region)))))
    spectrum = np.abs(np.fft.rfft(region * np.hanning(len(region)), size))
    return np.fft.rfftfreq(size, 1 / sample_rate), spectrum


def harmonic_ratios(region: np.ndarray, f0: float, sample_rate: int) -> tuple[float, float]:
    """(a2/a1, a3/a1): band amplitudes (sqrt of the energy within +-f0/4) of harmonics 2 and 3."""
    freqs, spectrum = note_spectrum(region, sample_rate)
    amplitude = [np.sqrt(np.sum(spectrum[np.abs(freqs - k * f0) <= f0 / 4] ** 2)) for k in (1, 2, 3)]
    if 3 * f0 + f0 / 4 >= sample_rate / 2 or amplitude[0] <= 0:
        return float("nan"), float("nan")
    return float(amplitude[1] / amplitude[0]), float(amplitude[2] / amplitude[0])


def classify(decay_db: float, even: float, odd: float) -> str:
    """Timbre name from the clip's median features (see the module docstring)."""
    if decay_db >= DECAY_DB:
        return "plucked"
    return min(PROTOTYPES, key=lambda name: (even - PROTOTYPES[name][0]) ** 2 + (odd - PROTOTYPES[name][1]) ** 2)


def clip_attributes(wave: np.ndarray, sample_rate: int) -> dict:
    """Attributes of one clip: onsets_s, pitches_hz (voiced notes), features and the timbre."""
    wave = np.nan_to_num(np.asarray(wave, dtype=np.float64).reshape(-1))
    hop = max(1, round(HOP_S * sample_rate))
    env = energy_db(wave, sample_rate)
    onsets = detect_onsets(env, sample_rate) if len(wave) else np.zeros(0, np.int64)
    ends = np.append(onsets[1:], len(env))
    pitches, features = [], []
    for onset, end in zip(onsets, ends):
        peak = onset + int(np.argmax(env[onset : min(end, onset + round(0.06 / HOP_S) + 1)]))
        active = np.flatnonzero(env[peak:end] < env[peak] - ACTIVE_DB)
        last = peak + (int(active[0]) if len(active) else end - peak)
        region = wave[peak * hop : last * hop]
        if len(region) < MIN_REGION_S * sample_rate:
            continue
        f0 = estimate_f0(region, sample_rate)
        if f0 is None:
            continue
        later = min(peak + round(0.06 / HOP_S), end - 1)
        pitches.append(f0)
        features.append((env[peak] - env[later], *harmonic_ratios(region, f0, sample_rate)))
    timbre, summary = None, {"decay_db": float("nan"), "even": float("nan"), "odd": float("nan")}
    if features:
        summary = dict(zip(summary, np.nanmedian(np.asarray(features), axis=0).tolist()))
        if np.isfinite(list(summary.values())).all():
            timbre = classify(summary["decay_db"], summary["even"], summary["odd"])
    return {
        "onsets_s": (onsets * hop / sample_rate).round(4).tolist(),
        "pitches_hz": [round(p, 2) for p in pitches],
        **summary,
        "timbre": timbre,
        "timbre_index": TIMBRES.index(timbre) if timbre else -1,
    }


def audio_attributes(waves: Sequence[np.ndarray], sample_rate: int) -> list[dict]:
    """Per clip: ``onsets_s``, ``pitches_hz``, ``decay_db``, ``even``, ``odd``, ``timbre``, ``timbre_index``."""
    return [clip_attributes(np.asarray(wave), sample_rate) for wave in waves]


def cents_to_scale(pitches: np.ndarray) -> np.ndarray:
    """(N,) distance in cents from each pitch to the nearest SCALE_HZ pitch."""
    return np.abs(1200 * np.log2(np.asarray(pitches)[:, None] / np.asarray(SCALE_HZ)[None, :])).min(axis=1)


def audio_scores(
    waves: Sequence[np.ndarray], labels: Sequence[int], sample_rate: int, note_counts: Sequence[int] | None = None
) -> dict[str, float]:
    """``timbre_accuracy``, ``pitch_in_scale``, ``voiced_clips`` and, with ``note_counts``, ``onset_count_error``."""
    if len(waves) != len(labels) or not waves:
        raise ValueError(f"audio_scores: need as many labels as waves (at least one), got {len(labels)} and {len(waves)}")
    attributes = audio_attributes(waves, sample_rate)
    pitches = np.asarray([p for a in attributes for p in a["pitches_hz"]])
    scores = {
        "timbre_accuracy": float(np.mean([a["timbre_index"] == int(y) for a, y in zip(attributes, labels)])),
        "pitch_in_scale": float(np.mean(cents_to_scale(pitches) <= 50)) if len(pitches) else 0.0,
        "voiced_clips": float(np.mean([bool(a["pitches_hz"]) for a in attributes])),
    }
    if note_counts is not None:
        if len(note_counts) != len(waves):
            raise ValueError(f"audio_scores: note_counts has {len(note_counts)} entries for {len(waves)} waves")
        scores["onset_count_error"] = float(np.mean([abs(len(a["onsets_s"]) - n) for a, n in zip(attributes, note_counts)]))
    return scores
