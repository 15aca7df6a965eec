"""Video data: procedural bouncing-shape clips and the transform from a decoded clip to ``x``.

Clips vary in length on purpose: the trainer packs them into variable-length batches.
Letters: T frames, H/W height/width, C = 3 channels. Coordinates are fractions of the frame
side, as in ``datamodules.synthetic``; velocities are fractions of the side per frame.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from datamodules.decoders import BadSample
from datamodules.media.spec import MediaSpec, TokenAxis
from datamodules.synthetic import COLOURS, SHAPES, render_shape
from datamodules.transforms import ImageTransform, SampleTransform

VIDEO_SIZE = 16
"""Default side of the synthetic clips in pixels."""
VIDEO_SCALE_RANGE = (0.35, 0.55)
"""Shape extent: smaller than for still images so that there is room to move."""
SPEED_RANGE = (0.04, 0.1)
"""Speed in fractions of the side per frame (0.64 to 1.6 px per frame at 16 px)."""
DIRECTIONS = 8
"""Motion directions: multiples of 45 degrees, so that every caption word is exact."""


def bounce(start: float, velocity: float, low: float, high: float, steps: np.ndarray) -> np.ndarray:
    """Positions at ``steps`` of a point moving at ``velocity`` inside [low, high], reflected at the walls."""
    span = high - low
    if span <= 0:
        return np.full(steps.shape, (low + high) / 2)
    phase = np.mod(start - low + velocity * steps, 2 * span)  # unfold the reflections into a triangle wave
    return low + np.where(phase <= span, phase, 2 * span - phase)


def motion_words(vx: float, vy: float) -> str:
    """"up and to the left", "down", "to the right", ... (v grows downwards)."""
    vertical = "up" if vy < -1e-9 else "down" if vy > 1e-9 else ""
    horizontal = "to the left" if vx < -1e-9 else "to the right" if vx > 1e-9 else ""
    return " and ".join(word for word in (vertical, horizontal) if word)


def synthetic_videos(
    num: int, seed: int = 0, size: int | None = None, min_frames: int = 4, max_frames: int = 12
) -> Iterator[dict]:
    """Yield ``num`` clips ``{"__key__", "npy": uint8 (T, H, W, 3), "cls", "txt", "json"}``.

    One shape from SHAPES moves at constant speed in one of 8 directions and bounces off the
    walls (it always stays whole inside the frame); with probability 1/2 it changes colour at
    a random frame. ``cls`` indexes SHAPES; ``json`` holds the values the clip was rendered
    from (rounded first, so they reproduce it), ``colour_after``/``change_frame`` None when the
    colour does not change. Sample ``i`` is seeded by ``[seed, i]`` and does not depend on ``num``.
    """
    size = VIDEO_SIZE if size is None else size
    if size <= 0:
        raise ValueError(f"synthetic_videos: size must be positive, got {size}")
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"synthetic_videos: need 1 <= min_frames <= max_frames, got {min_frames} and {max_frames}")
    colour_names = sorted(COLOURS)
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(len(SHAPES)))
        colour = colour_names[int(rng.integers(len(colour_names)))]
        frames = int(rng.integers(min_frames, max_frames + 1))
        scale = round(float(rng.uniform(*VIDEO_SCALE_RANGE)), 4)
        r = scale / 2
        x0, y0 = (round(float(c), 4) for c in rng.uniform(r, 1 - r, size=2))
        angle = 2 * np.pi * int(rng.integers(DIRECTIONS)) / DIRECTIONS
        speed = float(rng.uniform(*SPEED_RANGE))
        vx, vy = (round(float(c), 4) + 0.0 for c in (speed * np.cos(angle), -speed * np.sin(angle)))  # + 0.0: no -0.0
        change = frames > 1 and rng.random() < 0.5
        colour_after = change_frame = None
        if change:
            shift = int(rng.integers(1, len(colour_names)))  # any other colour
            colour_after = colour_names[(colour_names.index(colour) + shift) % len(colour_names)]
            change_frame = int(rng.integers(1, frames))

        steps = np.arange(frames)
        xs, ys = bounce(x0, vx, r, 1 - r, steps), bounce(y0, vy, r, 1 - r, steps)
        shape = SHAPES[label]
        clip = np.stack([
            render_shape(shape, COLOURS[colour_after if change and t >= change_frame else colour], 4, x, y, scale, size)
            for t, (x, y) in enumerate(zip(xs, ys))
        ])  # (T, H, W, 3)
        caption = f"a {colour} {shape} moving {motion_words(vx, vy)}" + (f", turning {colour_after}" if change else "")
        yield {
            "__key__": f"{i:08d}",
            "npy": clip,
            "cls": label,
            "txt": caption,
            "json": {
                "shape": shape, "colour": colour, "colour_after": colour_after, "change_frame": change_frame,
                "frames": frames, "x0": x0, "y0": y0, "vx": vx, "vy": vy, "scale": scale,
            },
        }


class VideoTransform(SampleTransform):
    """Clip -> ``x`` float32 (3, T, size, size) in [-1, 1]: each frame resized and centre cropped.

    Frames are resized like ``ImageTransform`` (shorter side to ``size``, then centre crop).
    Long clips are truncated, keeping the first
    ``T = (min(frames, max_frames) // frame_multiple) * frame_multiple`` frames, so that the
    clip splits into whole temporal patches (a causal video codec's model: 1 + k m frames, the
    first frame alone, as Wan and LTX encode them); a clip with fewer frames than one token
    needs is a BadSample (counted and skipped by the pipeline like any other).

    Args:
        size: Output side in pixels; None: the model's (16 alone).
        max_frames: Longest clip kept; later frames are dropped. None: the frames the model
            samples (16 alone).
        frame_multiple: Frame count granularity; None: the model's (tpatch x the codec's temporal
            factor; 1 alone).
        video_key: Comma-separated sample fields to look for, first match wins: uint8
            (T, H, W, 3) clips (``npy``, or ``mp4`` decoded), or float ``npy`` in [0, 1].
    """

    def __init__(self, size: int | None = None, max_frames: int | None = None, frame_multiple: int | None = None,
                 video_key: str = "npy,mp4"):
        if any(v is not None and v <= 0 for v in (size, max_frames, frame_multiple)):
            raise ValueError(
                "VideoTransform: size, max_frames and frame_multiple must be positive, "
                f"got {size}, {max_frames}, {frame_multiple}"
            )
        self.stated = {"size": size, "max_frames": max_frames, "frame_multiple": frame_multiple}
        self.video_keys = tuple(k.strip() for k in video_key.split(",") if k.strip())
        self.follow(MediaSpec(time=TokenAxis(patch=frame_multiple or 1)))  # alone: tokens at tpatch = frame_multiple

    def follow(self, spec: MediaSpec) -> None:
        super().follow(spec)
        self.size = self.option("size", self.stated["size"], spec.size, 16)
        self.frame_transform = ImageTransform(size=self.size)  # owns the per-frame resize and crop
        self.frame_multiple = self.option("frame_multiple", self.stated["frame_multiple"], spec.time.multiple, 1,
                                          multiple=True)
        stated = self.stated["max_frames"]
        self.max_frames = stated if stated is not None else spec.frames or 16  # a data choice: never a contradiction
        if self.max_frames < self.frame_multiple:
            raise ValueError(f"VideoTransform: max_frames={self.max_frames} must be at least frame_multiple={self.frame_multiple}")

    def cost(self, sample: dict) -> int:
        _, t, h, w = sample["x"].shape
        return self.spec.video_tokens(t, h, w)

    def __call__(self, decoded: dict) -> dict:
        field, clip = self.first_present(decoded, self.video_keys)
        where = f"{self.where(decoded)}: {field}"
        if not isinstance(clip, np.ndarray) or clip.ndim != 4 or clip.shape[-1] != 3:
            got = f"shape {clip.shape}" if isinstance(clip, np.ndarray) else type(clip).__name__
            raise BadSample(f"{where}: expected a (T, H, W, 3) clip, got {got}")
        n = min(len(clip), self.max_frames)
        frames = self.spec.time.keep(n) if self.spec.time.causal else n // self.frame_multiple * self.frame_multiple
        if frames == 0:
            raise BadSample(f"{where}: {len(clip)} frames, expected at least frame_multiple={self.frame_multiple}")
        t, h, w, _ = clip[:frames].shape
        x = ImageTransform.to_tensor(clip[:frames].reshape(t * h, w, 3), where)  # (3, T*H, W); checks dtype, NaN, range
        x = self.frame_transform.resize_crop(x.reshape(3 * t, h, w))  # frames ride along as channels
        return {"x": x.reshape(3, t, self.size, self.size).contiguous(), **self.conditioning(decoded)}
