"""Audio-video data: a bouncing shape whose floor impacts click, and the transform that yields both streams.

``synthetic_audiovideo`` renders one shape from SHAPES (the class) that hops along the floor: its
height is a parabola of period P frames that touches the floor exactly at frames t0, t0 + P, ...
(whole frames, so the contact frame is unambiguous), while it drifts sideways and bounces off the
walls. Each contact starts a short decaying tone at sample ``round(k * sample_rate / fps)``; the
tone's pitch is the class's (IMPACT_HZ), so sound and picture carry the same label. Between
impacts the audio is silent. Sample ``i`` is seeded by ``[seed, i]`` and does not depend on ``num``.
Letters: T frames, H/W height/width, S audio samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from datamodules.audio import AudioTransform
from datamodules.media.spec import MediaSpec
from datamodules.synthetic import COLOURS, SHAPES, render_shape
from datamodules.transforms import SampleTransform
from datamodules.video import VIDEO_SIZE, bounce
from datamodules.writers import encode_audio

CLASSES = SHAPES
FPS = 8
SAMPLE_RATE = 8000
IMPACT_HZ = {"circle": 880.0, "square": 330.0, "triangle": 1320.0, "cross": 587.33}
"""Pitch of each class's impact sound (A5, E4, E6, D5): far apart, so the class is audible."""
IMPACT_SECONDS = 0.09
"""Length of one impact sound; shorter than the shortest period (3 frames = 0.375 s at 8 fps)."""
BOTTOM_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.0, "cross": 1.0}
"""Lowest point of each shape below its centre, in half-scales (as drawn by ``shape_mask``)."""
SCALE_RANGE = (0.3, 0.4)
PERIOD_RANGE = (3, 6)
"""Frames from one floor contact to the next."""


def impact_sound(f0: float, sample_rate: int) -> np.ndarray:
    """(IMPACT_SECONDS * sample_rate,) a struck tone: 3 decaying harmonics, instant attack, peak 1."""
    t = np.arange(round(IMPACT_SECONDS * sample_rate)) / sample_rate
    harmonics = [(k, a) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)) if k * f0 < 0.45 * sample_rate]  # no aliasing
    partials = sum(a * np.sin(2 * np.pi * k * f0 * t) for k, a in harmonics)
    wave = partials * np.exp(-t / 0.02) * np.clip((IMPACT_SECONDS - t) / 0.01, 0.0, 1.0)  # 10 ms fade-out
    return wave / np.abs(wave).max()


def synthetic_audiovideo(
    num: int, seed: int = 0, size: int | None = None, min_frames: int = 6, max_frames: int = 12,
    fps: int = FPS, sample_rate: int = SAMPLE_RATE,
) -> Iterator[dict]:
    """Yield ``num`` clips ``{"__key__", "npy": uint8 (T, H, W, 3), "wav", "cls", "txt", "json"}``; ``cls`` indexes CLASSES.

    The audio lasts exactly T / fps seconds. ``json`` holds ``contact_frames`` (the frames where
    the shape touches the floor, each the onset of an impact sound), the period and the motion."""
    size = VIDEO_SIZE if size is None else size
    if not 1 <= min_frames <= max_frames or size <= 0:
        raise ValueError(f"synthetic_audiovideo: need size > 0 and 1 <= min_frames <= max_frames, got {size}, "
                         f"{min_frames}, {max_frames}")
    colour_names = sorted(COLOURS)
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(len(CLASSES)))
        shape, colour = CLASSES[label], colour_names[int(rng.integers(len(colour_names)))]
        frames = int(rng.integers(min_frames, max_frames + 1))
        scale = round(float(rng.uniform(*SCALE_RANGE)), 4)
        r = scale / 2
        period = int(rng.integers(PERIOD_RANGE[0], PERIOD_RANGE[1] + 1))
        first = int(rng.integers(0, min(period, frames)))  # at least one contact in the clip
        floor = 1 - BOTTOM_EXTENT[shape] * r  # centre height at which the shape touches the bottom edge
        height = float(rng.uniform(0.25, floor - r))  # hop height; the top stays inside the frame
        x0 = float(rng.uniform(r, 1 - r))
        vx = float(rng.choice([-1, 1]) * rng.uniform(0.02, 0.06))
        steps = np.arange(frames)
        phase = np.mod(steps - first, period) / period  # 0 at a contact
        ys = floor - height * 4 * phase * (1 - phase)
        xs = bounce(x0, vx, r, 1 - r, steps)
        clip = np.stack([render_shape(shape, COLOURS[colour], 4, x, y, scale, size) for x, y in zip(xs, ys)])
        contacts = [int(k) for k in steps[phase == 0]]
        wave = np.zeros(round(frames * sample_rate / fps))
        sound = impact_sound(IMPACT_HZ[shape], sample_rate)
        for k in contacts:
            start = round(k * sample_rate / fps)
            n = min(len(sound), len(wave) - start)
            wave[start : start + n] += sound[:n]
        wave *= rng.uniform(0.4, 0.9)
        pace = "fast" if period <= 4 else "slowly"
        yield {
            "__key__": f"{i:08d}",
            "npy": clip,
            "wav": encode_audio(wave, sample_rate),
            "cls": label,
            "txt": f"a {colour} {shape} hopping {pace} {'left' if vx < 0 else 'right'}",
            "json": {
                "shape": shape, "colour": colour, "frames": frames, "fps": fps, "sample_rate": sample_rate,
                "contact_frames": contacts, "period": period, "height": round(height, 4), "scale": scale,
                "x0": round(x0, 4), "vx": round(vx, 4),
            },
        }


class AudioVideoTransform(SampleTransform):
    """Clip + soundtrack -> ``x`` float32 (3, T, size, size) in [-1, 1] and ``audio`` float32 (T * sample_rate / fps,).

    The video goes through ``VideoTransform`` (resize, crop, T a multiple of ``frame_multiple``);
    the audio through ``AudioTransform`` (mono, resampled), then cut or zero-padded to the kept
    frames' duration, so that sample ``round(k * sample_rate / fps)`` belongs to frame k.
    A sample costs its video tokens plus its audio tokens.

    Args:
        size: Output side in pixels; None: the model's (16 alone).
        max_frames: Longest clip kept (in frames); later frames and their audio are dropped.
            None: the frames the model samples (16 alone).
        frame_multiple: Frame count granularity; None: the model's (the video tokenizer's ``tpatch``; 1 alone).
        fps: Frame rate of the clips (the same for every clip of the data set); None: the model's (8 alone).
        sample_rate: Output audio sample rate; None: the model's (8000 alone).
    """

    def __init__(self, size: int | None = None, max_frames: int | None = None, frame_multiple: int | None = None,
                 fps: int | None = None, sample_rate: int | None = None, video_key: str = "npy,mp4",
                 audio_key: str = "wav,flac"):
        from datamodules.video import VideoTransform

        if fps is not None and fps <= 0:
            raise ValueError(f"AudioVideoTransform: fps must be positive, got {fps}")
        self.stated = {"fps": fps}
        self.video = VideoTransform(size=size, max_frames=max_frames, frame_multiple=frame_multiple, video_key=video_key)
        self.audio = AudioTransform(sample_rate=sample_rate, min_seconds=0.0, audio_key=audio_key)
        self.follow(self.video.spec)  # alone: the video's own numbers

    def follow(self, spec: MediaSpec) -> None:
        super().follow(spec)
        self.video.follow(spec)
        self.audio.follow(spec)
        self.fps = self.option("fps", self.stated["fps"], spec.fps, FPS)
        self.size, self.sample_rate = self.video.size, self.audio.sample_rate
        self.audio.max_seconds = self.video.max_frames / self.fps  # the audio of the frames kept

    def cost(self, sample: dict) -> int:
        return self.video.cost(sample) + self.audio.cost({"x": sample["audio"]})

    def __call__(self, decoded: dict) -> dict:
        out = self.video(decoded)
        wave = self.audio(decoded)["x"]
        samples = round(out["x"].shape[1] * self.sample_rate / self.fps)
        wave = torch.nn.functional.pad(wave[:samples], (0, max(0, samples - len(wave))))
        return {**out, "audio": wave}
