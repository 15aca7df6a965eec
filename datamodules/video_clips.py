"""Cut clips out of one video file by timestamp: frames at a target rate, resized, and the soundtrack of the same span.

A clip of T frames at ``fps`` starting at ``start`` seconds (counted from the video's first frame)
holds, as frame k, the source frame SHOWN at time ``start + k / fps``: the last source frame whose
timestamp is <= that time. Resampling by time, not by taking every n-th frame, gives the right
motion speed for any source rate (25, 29.97, variable), and repeats frames when the source is
slower than ``fps``. Times are exact fractions (``pts * time_base``), so a target that falls on a
source frame's timestamp picks that frame, never its predecessor by rounding. A clip exists when
the video still shows a frame at its last time, ``start + (T - 1) / fps`` (the last source frame is
shown for its duration).

Its soundtrack is the audio of exactly ``[start, start + T / fps)`` on the same container clock:
every channel averaged to mono, resampled to ``sample_rate`` (torchaudio, sinc interpolation) in a
window aligned so that output sample i is the source's sound at ``start + i / sample_rate``, and
``round(T * sample_rate / fps)`` samples long (what ``AudioVideoTransform`` expects).

Each file is decoded once, front to back, holding only the frames of the clips not yet complete;
with ``max_clips`` decoding stops once the last clip (and its sound) is read.
Letters: T frames, H/W height/width, S audio samples, K audio channels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from datamodules.decoders import MAX_IMAGE_PIXELS, MAX_VIDEO_FRAMES
from datamodules.sources import Skipped

DEMUXERS = {"mp4": "mp4", "mov": "mov", "webm": "matroska", "mkv": "matroska", "avi": "avi", "gif": "gif"}
"""File extension -> the one FFmpeg demuxer tried (no format probing: a playlist or concat file
renamed .mp4 is refused instead of being followed to the files it names)."""
VIDEO_EXTENSIONS = tuple(DEMUXERS)
RESAMPLE_MARGIN = 32
"""Output samples decoded beyond each side of a soundtrack span, so the sinc kernel sees real context."""


def exact(value: float | Fraction) -> Fraction:
    """A decimal option (0.1, 29.97) as the fraction it was written as, not its binary float."""
    return value if isinstance(value, Fraction) else Fraction(str(value))


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from a video file (the ``shards videos`` / ``shards audiovideo`` options)."""

    frames: int = 16
    """Frames per clip (T)."""
    fps: float = 8.0
    """Frame rate of the clips; frames are picked by timestamp, whatever the source's rate."""
    stride: float | None = None
    """Seconds from one clip's start to the next; None: frames / fps (back to back). Shorter strides overlap."""
    max_clips: int | None = None
    """Most clips taken from one video (the first ones); None: all that fit."""
    size: int = 256
    """Frame side in pixels: the shorter side is resized to it and the centre square kept."""
    keep_aspect: bool = False
    """Keep the aspect ratio instead: about size^2 pixels, sides rounded to ``multiple`` (aspect capped at 4)."""
    multiple: int = 16
    """With keep_aspect, frame sides are multiples of this (the model's patch x the codec's stride)."""
    min_motion: float | None = None
    """Skip clips whose mean absolute difference between consecutive frames (0-255 levels) is below this."""
    sample_rate: int | None = None
    """Audio-video: the soundtrack's rate in Hz; None: video only."""
    max_frames_read: int = 100_000
    """Source frames decoded per video at most (about 55 min at 30 fps): a longer video gives the clips of its first
    frames and is named as cut short, so that a GIF of tens of thousands of frames is not read to its end."""

    def __post_init__(self) -> None:
        checks = {
            "frames": 1 <= self.frames <= MAX_VIDEO_FRAMES, "fps": self.fps > 0,
            "stride": self.stride is None or self.stride > 0, "max_clips": self.max_clips is None or self.max_clips >= 1,
            "size": self.size >= 1, "multiple": self.multiple >= 1,
            "min_motion": self.min_motion is None or self.min_motion >= 0,
            "sample_rate": self.sample_rate is None or self.sample_rate >= 1, "max_frames_read": self.max_frames_read >= 1,
        }
        wanted = {"frames": f"1 to {MAX_VIDEO_FRAMES}", "fps": "> 0", "stride": "> 0 seconds", "max_clips": ">= 1",
                  "size": ">= 1", "multiple": ">= 1", "min_motion": ">= 0", "sample_rate": ">= 1 Hz",
                  "max_frames_read": ">= 1"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}: expected {wanted[name]}, got {getattr(self, name)}")

    @property
    def rate(self) -> Fraction:
        return exact(self.fps)

    @property
    def step(self) -> Fraction:
        """Seconds between clip starts."""
        return self.frames / self.rate if self.stride is None else exact(self.stride)

    @property
    def seconds(self) -> Fraction:
        """Duration of one clip: T / fps."""
        return self.frames / self.rate

    @property
    def audio_samples(self) -> int:
        """Soundtrack samples per clip: round(T * sample_rate / fps)."""
        return round(self.seconds * (self.sample_rate or 0))


@dataclass
class Clip:
    index: int
    """Position among the video's clip starts: the clip starts at index * stride."""
    start: Fraction
    """Seconds from the video's first frame."""
    frames: np.ndarray
    """uint8 (T, H, W, 3)."""
    audio: np.ndarray | None = None
    """float32 (S,) mono in [-1, 1] at the options' sample_rate; None for video only."""


@dataclass
class VideoClips:
    clips: list[Clip]
    seconds: float
    """Duration of the video (first frame to the end of the last)."""
    static: int = 0
    """Clips skipped as below min_motion."""
    silent: int = 0
    """Clips skipped because the soundtrack ends more than one frame before the clip does."""
    cut: bool = False
    """Decoding stopped at max_frames_read: the clips are those of the video's first frames."""


def frame_geometry(height: int, width: int, options: ClipOptions) -> tuple[int, int, int, int]:
    """(resize_h, resize_w, out_h, out_w): resize a source frame to the first pair, then centre-crop the second."""
    if not options.keep_aspect:
        scale = options.size / min(height, width)
        return max(options.size, round(height * scale)), max(options.size, round(width * scale)), options.size, options.size
    from datamodules.transforms import ImageTransform  # one rule for "about size^2 pixels" (as images keep_aspect)

    images = ImageTransform(size=options.size, keep_aspect=True, multiple=options.multiple)
    out_h, out_w = images.aspect_size(height, width)
    if 1 / images.max_aspect <= width / height <= images.max_aspect:
        return out_h, out_w, out_h, out_w  # sides rounded to the multiple: a slight stretch, nothing cropped
    scale = max(out_h / height, out_w / width)  # over-wide: fill (out_h, out_w), crop the excess
    return max(out_h, round(height * scale)), max(out_w, round(width * scale)), out_h, out_w


class FrameSampler:
    """Fed the source frames in order, collects the clips: frame k of clip j is the one shown at ``j * step + k / rate``."""

    def __init__(self, options: ClipOptions):
        self.options = options
        self.open: list[tuple[int, list[np.ndarray]]] = []  # (clip index, frames so far)
        self.done: list[tuple[int, list[np.ndarray]]] = []
        self.next_clip = 0
        self.shown: tuple[Fraction, object] | None = None  # the frame on screen: (its time, the decoded frame)
        self.image: np.ndarray | None = None  # the shown frame converted, once it is first used
        self.geometry: tuple[int, int, int, int] | None = None

    @property
    def finished(self) -> bool:
        """Every clip that max_clips allows is complete: decoding can stop."""
        limit = self.options.max_clips
        return limit is not None and self.next_clip >= limit and not self.open

    def push(self, time: Fraction, frame) -> None:
        """The next source frame, shown from ``time`` (seconds from the first frame); the previous one ends there."""
        self.fill(until=time)
        self.shown, self.image = (time, frame), None

    def fill(self, until: Fraction) -> None:
        """Give the shown frame to every clip target before ``until``; at the end, ``until`` is the video's end."""
        if self.shown is None:
            return
        step, rate, limit = self.options.step, self.options.rate, self.options.max_clips
        while (limit is None or self.next_clip < limit) and self.next_clip * step < until:
            self.open.append((self.next_clip, []))
            self.next_clip += 1
        for index, frames in self.open:
            while len(frames) < self.options.frames and index * step + Fraction(len(frames)) / rate < until:
                frames.append(self.converted())
        self.done += [clip for clip in self.open if len(clip[1]) == self.options.frames]
        self.open = [clip for clip in self.open if len(clip[1]) < self.options.frames]

    def converted(self) -> np.ndarray:
        """The shown frame as uint8 (h, w, 3), resized and cropped (converted once, however many clips use it)."""
        if self.image is None:
            frame = self.shown[1]
            if self.geometry is None:
                self.geometry = frame_geometry(frame.height, frame.width, self.options)
            resize_h, resize_w, out_h, out_w = self.geometry
            rgb = frame.reformat(width=resize_w, height=resize_h, format="rgb24", interpolation="BICUBIC").to_ndarray()
            top, left = (resize_h - out_h) // 2, (resize_w - out_w) // 2
            self.image = np.ascontiguousarray(rgb[top : top + out_h, left : left + out_w])
        return self.image


class Soundtrack:
    """An audio stream decoded to mono float32 at its own rate; sample i sounds at ``start + i / rate``."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.start: Fraction | None = None
        self.rate = 0
        self.length = 0

    @property
    def end(self) -> Fraction:
        return self.start + Fraction(self.length, self.rate) if self.rate else Fraction(0)

    def add(self, frame) -> None:
        if self.start is None:
            self.rate = frame.sample_rate
            self.start = Fraction(frame.pts) * frame.time_base if frame.pts is not None else Fraction(0)
        elif frame.sample_rate != self.rate:
            raise ValueError(f"audio sample rate changes mid-stream ({self.rate} -> {frame.sample_rate} Hz)")
        chunk = as_float(frame.to_ndarray(), frame.format.name)  # planar (K, S) or packed (1, S * K)
        channels = len(frame.layout.channels)
        chunk = chunk if frame.format.is_planar else chunk.reshape(-1, channels).T  # (K, S)
        self.chunks.append(chunk.mean(axis=0, dtype=np.float32))
        self.length += chunk.shape[1]

    def margin(self, sample_rate: int) -> int:
        """Target samples of real context kept on each side of a span: more when upsampling (a wider kernel)."""
        return RESAMPLE_MARGIN * max(1, math.ceil(sample_rate / self.rate))

    def span(self, start: Fraction, samples: int, sample_rate: int) -> tuple[np.ndarray, int]:
        """((samples,) float32 at sample_rate from time ``start``, how many of them the stream covers); silence outside it.

        Resamples a window around the span, starting on a sample where the source and the target
        grids meet (a multiple of rate / gcd), so the result equals the whole stream resampled, then cut.
        """
        import torch

        g = math.gcd(self.rate, sample_rate)
        source_unit, target_unit = self.rate // g, sample_rate // g  # samples of each rate in one shared tick
        first = round((start - self.start) * sample_rate)  # the span's first sample on the target grid of the stream
        margin = self.margin(sample_rate)
        tick0 = (first - margin) // target_unit
        tick1 = -(-(first + samples + margin) // target_unit)
        track = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks = [track]
        lo, hi = tick0 * source_unit, tick1 * source_unit
        window = np.zeros(hi - lo, dtype=np.float32)
        a, b = max(lo, 0), min(hi, len(track))
        if b > a:
            window[a - lo : b - lo] = track[a:b]
        if self.rate != sample_rate:
            with torch.no_grad():
                window = resampler(self.rate, sample_rate)(torch.from_numpy(window)).numpy()
        offset = first - tick0 * target_unit
        covered = min(first + samples, math.floor(self.length * sample_rate / self.rate)) - max(first, 0)
        return np.clip(window[offset : offset + samples], -1.0, 1.0).astype(np.float32), max(0, covered)


@functools.lru_cache(maxsize=8)
def resampler(source_rate: int, target_rate: int):
    """torchaudio's sinc resampler between two rates, its kernel built once (44.1 -> 16 kHz: 0.1 s to build)."""
    import torchaudio.transforms

    return torchaudio.transforms.Resample(source_rate, target_rate)


def as_float(samples: np.ndarray, format_name: str) -> np.ndarray:
    """Decoded audio samples -> float32 in [-1, 1] (s16, s32, u8, flt, dbl; planar or packed)."""
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.signedinteger):
        return samples.astype(np.float32) / float(2 ** (8 * samples.dtype.itemsize - 1))
    raise ValueError(f"unsupported audio sample format {format_name}")


def motion(frames: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames of a uint8 (T, H, W, 3) clip, in 0-255 levels."""
    if len(frames) < 2:
        return math.inf
    return float(np.abs(np.diff(frames.astype(np.int16), axis=0)).mean())


def read_clips(path: str | Path, options: ClipOptions) -> VideoClips:
    """Decode one video file into its clips (and their soundtracks when ``options.sample_rate`` is set).

    Raises Skipped for a readable file without clips (shorter than one clip, no audio
    stream where one is needed), any other exception for a file that cannot be read.
    """
    import av  # lazily: PyAV only when videos are read

    path = Path(path)
    demuxer = DEMUXERS.get(path.suffix[1:].lower())
    if demuxer is None:
        raise ValueError(f"unsupported extension {path.suffix!r}; expected one of {VIDEO_EXTENSIONS}")
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    with av.open(str(path), format=demuxer, metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        video = container.streams.video[0]
        width, height = video.codec_context.width, video.codec_context.height
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{width}x{height} frames exceed MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
        streams, sound = [video], None
        if options.sample_rate is not None:
            if not container.streams.audio:
                raise Skipped("without audio", "no audio stream")
            streams.append(container.streams.audio[0])
            sound = Soundtrack()
        sampler = FrameSampler(options)
        first = last = duration = gap = None
        count = decoded = 0
        cut = False
        for frame in container.decode(*streams):
            if not isinstance(frame, av.VideoFrame):
                sound.add(frame)
            else:
                if decoded == options.max_frames_read:
                    cut = True  # the frames so far make the clips; the file is named as cut short
                    break
                decoded += 1
                if frame.width * frame.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{frame.width}x{frame.height} frame exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
                time = frame_time(frame, count, video)
                first = time if first is None else first
                if last is not None and time <= last:
                    continue  # a repeated or out-of-order timestamp: the frame already on screen stays
                duration = Fraction(frame.duration) * frame.time_base if frame.duration else None
                gap, last, count = (None if last is None else time - last), time, count + 1
                sampler.push(time - first, frame)
            if sampler.finished and (sound is None or heard(sound, first + (sampler.next_clip - 1) * options.step, options)):
                break
        if first is None:
            raise ValueError("no decodable video frames")
        if duration is None:
            duration = gap
        if duration is None:
            rate = video.average_rate or video.guessed_rate
            duration = 1 / Fraction(rate) if rate else Fraction(0)
        seconds = last - first + duration
        sampler.fill(until=seconds)
    result = VideoClips(clips=[], seconds=float(seconds), cut=cut)
    for index, frames in sampler.done:
        clip = Clip(index=index, start=index * options.step, frames=np.stack(frames))
        if options.min_motion is not None and motion(clip.frames) < options.min_motion:
            result.static += 1
            continue
        if sound is not None:
            if sound.start is None:
                raise Skipped("without audio", "the audio stream holds no decodable sound")
            clip.audio, covered = sound.span(first + clip.start, options.audio_samples, options.sample_rate)
            if covered < options.audio_samples - options.sample_rate / options.rate:  # pads at most one frame of silence
                result.silent += 1
                continue
        result.clips.append(clip)
    if not sampler.done:
        raise Skipped("too short", f"{float(seconds):.2f} s, shorter than one clip ({float(options.seconds):.2f} s)")
    return result


def heard(sound: Soundtrack, start: Fraction, options: ClipOptions) -> bool:
    """Whether the soundtrack is decoded past the end of the clip starting at ``start`` (and the resampling margin)."""
    if sound.start is None:
        return False
    return sound.end >= start + options.seconds + Fraction(sound.margin(options.sample_rate), options.sample_rate)


def frame_time(frame, index: int, stream) -> Fraction:
    """A frame's presentation time in seconds (exact); without a timestamp, its index over the stream's rate."""
    if frame.pts is not None and frame.time_base is not None:
        return Fraction(frame.pts) * frame.time_base
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ValueError("frames without timestamps and no frame rate")
    return index / Fraction(rate)
