"""``duoflow shards videos|audiovideo``: a folder of video files -> WebDataset shards of fixed-rate clips.

Input: ``SRC/<name>.{mp4,webm,mov,mkv,avi,gif}`` or ``SRC/<class>/<name>.<ext>``. Each video is cut into clips of T frames at ``fps``
(by timestamp, see ``datamodules.video_clips``), every ``stride`` seconds, at most ``max_clips``.

Storage: each clip once, as ``npy`` uint8 (T, H, W, 3), the field ``VideoTransform``,
``AudioVideoTransform`` and ``shards encode`` read. Not MP4, because: the stored frames are exactly
the pixels cut here (a re-encode would lose detail a second time, after the source's own codec);
training decodes nothing (``np.load`` of the tar member, no video decoder in the data workers,
no MP4 frame limits); and the clip already has the training rate, size and length. The price is
disk: T * H * W * 3 bytes, 3 MiB for 16 frames of 256 x 256, ten to fifty times an MP4 of the
same clip, so shards hold 100 clips by default. Beside it: ``json`` (source path relative to SRC,
start/end seconds, fps, frames, class name; audio-video: sample_rate), ``cls``, ``txt`` and, for
``audiovideo``, ``wav``: 16-bit PCM mono of exactly the clip's span, round(T * sample_rate / fps)
samples. Keys are ``<video index>-<clip index>``: the video's position in the sorted file list and
the clip's position among its starts (start = clip index * stride).

The folder layout, classes (``OUT/classes.json``), captions (``--captions`` manifest, ``.txt`` and
``.json`` sidecars) and the ``holdout`` split (OUT/train and OUT/holdout by a hash of the path, so
all clips of a video land in one split) are those of every folder command: ``datamodules.sources``.

Order: the videos are shuffled once with a fixed seed (as image folders are) so that a shard mixes
classes. ``workers`` processes decode files in parallel; the parent writes their clips in that fixed
order, so the shards are byte-identical for any number of workers. Files that cannot be used are
skipped, counted and named (a warning each, and the summary line): unreadable (empty, not a video,
corrupt), too short for one clip, without an audio stream (audio-video).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from datamodules.sources import MediaFile, Report, plural, shown
from datamodules.video_clips import VIDEO_EXTENSIONS, ClipOptions, VideoClips, read_clips
from datamodules.writers import Ingester, by_path, ingest

log = logging.getLogger(__name__)


@dataclass
class ClipReport(Report):
    """A folder ``Report`` of clips cut from videos, with the clips dropped for motion or sound."""

    unit: str = "clip"
    source: str = "video"
    static: int = 0
    silent: int = 0
    cut: list[str] = field(default_factory=list)
    """Videos cut short at max_frames_read (paths relative to SRC)."""
    max_frames_read: int = 0

    def summary(self) -> str:
        line = super().summary()
        if self.cut:
            line += f"; {plural(len(self.cut), 'video')} cut short at --max-frames-read={self.max_frames_read} ({shown(self.cut)})"
        if self.static:
            line += f"; {plural(self.static, 'clip')} below --min-motion"
        if self.silent:
            line += f"; {plural(self.silent, 'clip')} past the end of their soundtrack"
        return line


def write_video_clips(
    src: str, out: str, options: ClipOptions, captions: str | None = None, holdout: float = 0.0, workers: int = 1,
    shard_size: int = 100, prefix: str = "video", progress: bool = True,
) -> ClipReport:
    """Cut every video of ``src`` into clips and write them as shards to ``out`` (see the module docstring)."""
    kind = Ingester(VIDEO_EXTENSIONS, "videos", functools.partial(by_path, functools.partial(read_clips, options=options)),
                    functools.partial(clip_samples, options=options))
    return ingest(kind, ClipReport(max_frames_read=options.max_frames_read), src, out, captions=captions,
                  holdout=holdout, shard_size=shard_size, prefix=prefix, workers=workers, progress=progress)


def clip_samples(video: MediaFile, result: VideoClips, report: ClipReport, options: ClipOptions) -> list[tuple[str, dict]]:
    """``Ingester.samples``: the clips of one video, and its clips dropped or cut short counted in ``report``."""
    report.static += result.static
    report.silent += result.silent
    if result.cut:
        log.warning("%s: cut short at --max-frames-read=%d frames read", video.path, options.max_frames_read)
        report.cut.append(video.name)
    return [clip_sample(video, clip, options) for clip in result.clips]


def clip_sample(video: MediaFile, clip, options: ClipOptions) -> tuple[str, dict]:
    """(key, fields) of one clip: npy, json, and the soundtrack as wav (16-bit PCM, encoded by the shard writer)."""
    meta = {"start": round(float(clip.start), 6), "end": round(float(clip.start + options.seconds), 6),
            "fps": options.fps, "frames": options.frames}
    fields = {"npy": clip.frames, "json": meta}
    if clip.audio is not None:
        fields["wav"], meta["sample_rate"] = (clip.audio, options.sample_rate), options.sample_rate
    return f"{video.index:06d}-{clip.index:04d}", fields
