"""Audio-video synchrony of hopping-shape clips (datamodules.audiovideo), measured without learning.

Letters: T frames, H/W height/width, S audio samples.

Visual contacts: frames whose object touches the bottom edge, i.e. the bottom pixel row holds
foreground (``checkers.video.foreground``) and the frame is valid (its foreground covers between
MIN_AREA and MAX_AREA of the frame: noise and empty frames are not). A run of touching frames
counts once, at its first frame. Contact k is at time k / fps.
Audio onsets: ``checkers.audio.detect_onsets`` on the 5 ms energy envelope (10 dB rises).

``sync_scores`` over clips:
    sync_offset_ms   mean over visual contacts of the distance to the nearest audio onset, capped at
                     CAP_MS (also when the clip has no onset); CAP_MS when no clip shows a contact.
                     Real clips: a few ms (the envelope's resolution); noise: near CAP_MS.
    sync_offset_frames  the same in video frames.
    sync_f1          contacts and onsets matched one to one within half a frame: harmonic mean of
                     matched / contacts and matched / onsets (0 without any).
    contact_clips    fraction of clips with at least one visual contact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.evaluation.checkers.audio import HOP_S, detect_onsets, energy_db
from app.evaluation.checkers.video import MAX_AREA, MIN_AREA, foreground

CAP_MS = 500.0


def contact_frames(clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> frame indices where the object first touches the bottom edge."""
    fg = foreground(clip)  # (T, H, W)
    area = fg.mean(axis=(1, 2))
    touching = fg[:, -1, :].any(-1) & (area >= MIN_AREA) & (area <= MAX_AREA)
    return np.flatnonzero(touching & ~np.concatenate([[False], touching[:-1]]))


def onset_times(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """(S,) wave -> onset times in seconds."""
    wave = np.nan_to_num(np.asarray(wave, dtype=np.float64).reshape(-1))
    if not len(wave):
        return np.zeros(0)
    return detect_onsets(energy_db(wave, sample_rate), sample_rate) * max(1, round(HOP_S * sample_rate)) / sample_rate


def matched(a: np.ndarray, b: np.ndarray, tolerance: float) -> int:
    """Pairs of a and b (sorted times) matched one to one, greedily by distance, within tolerance."""
    pairs = sorted((abs(x - y), i, j) for i, x in enumerate(a) for j, y in enumerate(b) if abs(x - y) <= tolerance)
    used_a, used_b = set(), set()
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a)


def sync_scores(clips: Sequence[np.ndarray], waves: Sequence[np.ndarray], fps: float, sample_rate: int) -> dict[str, float]:
    """``sync_offset_ms``, ``sync_offset_frames``, ``sync_f1``, ``contact_clips`` (see the module docstring)."""
    if len(clips) != len(waves) or not len(clips):
        raise ValueError(f"sync_scores: need as many waves as clips (at least one), got {len(waves)} and {len(clips)}")
    offsets, hits, n_contacts, n_onsets, with_contact = [], 0, 0, 0, 0
    for clip, wave in zip(clips, waves):
        contacts = contact_frames(np.asarray(clip)) / fps
        onsets = onset_times(wave, sample_rate)
        for c in contacts:
            offsets.append(min(CAP_MS, 1000 * np.abs(onsets - c).min()) if len(onsets) else CAP_MS)
        hits += matched(contacts, onsets, 0.5 / fps)
        n_contacts, n_onsets = n_contacts + len(contacts), n_onsets + len(onsets)
        with_contact += bool(len(contacts))
    offset = float(np.mean(offsets)) if offsets else CAP_MS
    f1 = 2 * hits / (n_contacts + n_onsets) if n_contacts + n_onsets else 0.0
    return {"sync_offset_ms": offset, "sync_offset_frames": offset * fps / 1000, "sync_f1": float(f1),
            "contact_clips": with_contact / len(clips)}
