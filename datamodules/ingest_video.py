"""``duoflow shards videos|audiovideo``: a folder of video files -> WebDataset shards of fixed-rate clips.

Input: ``SRC/<name>.{mp4,webm,mov,mkv,avi,gif}`` (samples without class) or
``SRC/<class>/<name>.<ext>`` (class ids = the sorted folder names, written to ``OUT/classes.json``;
files directly in SRC are then ignored). Each video is cut into clips of T frames at ``fps``
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

Captions, first found wins: the ``--captions`` manifest (CSV with a header, or JSON lines; fields
``path`` relative to SRC, ``caption`` (or ``text``), optional ``class``), a ``<name>.txt`` beside
the video, a ``<name>.json`` beside it holding ``{"caption": ...}`` or ``{"text": ...}``. A
manifest ``class`` labels videos of a flat folder (class ids = the sorted names it uses; videos it
gives no class have no ``cls``); in a folder of class sub-folders it must name the video's own folder.

Held-out split: ``holdout=F`` writes ``OUT/train`` and ``OUT/holdout``, each a complete shard folder
(index.json, classes.json). A video is held out when the first 8 bytes of sha256 of its path
relative to SRC, read as a fraction of 2^64, fall below F: all clips of a video land in one split,
and adding files never moves a video from one split to the other. Without it, shards go to OUT.

Order: the videos are shuffled once with a fixed seed (as image folders are) so that a shard mixes
classes. ``workers`` processes decode files in parallel; the parent writes their clips in that fixed
order, so the shards are byte-identical for any number of workers. Files that cannot be used are
skipped, counted and named (a warning each, and the summary line): unreadable (empty, not a video,
corrupt), too short for one clip, without an audio stream (audio-video).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from datamodules.video_clips import VIDEO_EXTENSIONS, ClipOptions, SkippedVideo, VideoClips, read_clips
from datamodules.writers import ShardWriter, write_classes

log = logging.getLogger(__name__)

SPLITS = ("train", "holdout")
SHOWN_PATHS = 5
"""Paths named per skip category in the summary line (all of them are in the warnings)."""


@dataclass
class VideoFile:
    index: int
    """Position in the sorted file list: the first part of its clips' keys."""
    path: Path
    name: str
    """Path relative to SRC, with "/" separators."""
    label: int | None = None
    caption: str | None = None


@dataclass
class Report:
    """What an ingest wrote and skipped; ``summary()`` is the line printed at the end."""

    files: int = 0
    videos: int = 0
    """Files that gave at least one clip."""
    clips: dict[str, int] = field(default_factory=dict)
    """Clips written per split ("train", "holdout")."""
    skipped: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> paths (relative to SRC) of the files skipped for it."""
    static: int = 0
    silent: int = 0
    seconds: float = 0.0
    paths: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = sum(self.clips.values())
        rate = f"{self.files / self.seconds:.2f} files/s, {total / self.seconds:.2f} clips/s" if self.seconds else ""
        splits = " (" + ", ".join(f"{split} {n}" for split, n in self.clips.items()) + ")" if len(self.clips) > 1 else ""
        line = f"{plural(total, 'clip')}{splits} from {plural(self.videos, 'video')} in {self.seconds:.2f} s ({rate})"
        skipped = sum(len(paths) for paths in self.skipped.values())
        parts = [f"{len(paths)} {reason} ({', '.join(sorted(paths)[:SHOWN_PATHS])}{', ...' if len(paths) > SHOWN_PATHS else ''})"
                 for reason, paths in sorted(self.skipped.items())]
        line += f"; {skipped} skipped" + (": " + ", ".join(parts) if parts else "")
        if self.static:
            line += f"; {plural(self.static, 'clip')} below --min-motion"
        if self.silent:
            line += f"; {plural(self.silent, 'clip')} past the end of their soundtrack"
        return line


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def list_videos(src: str) -> tuple[list[str], list[VideoFile]]:
    """(class names, video files sorted by path): ``src/<class>/<name>.<ext>`` or ``src/<name>.<ext>``."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {src!r} does not exist; expected a directory of videos or of class sub-folders")

    def is_video(path: Path) -> bool:
        return path.is_file() and not path.name.startswith(".") and path.suffix[1:].lower() in VIDEO_EXTENSIONS

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = [(label, path) for label, name in enumerate(classes) for path in sorted((root / name).iterdir()) if is_video(path)]
    if not classes:
        found = [(None, path) for path in sorted(root.iterdir()) if is_video(path)]
    if not found:
        raise ValueError(f"video folder {src!r} holds no videos; expected {src}/[<class>/]<name>.{{{','.join(VIDEO_EXTENSIONS)}}}")
    return classes, [VideoFile(i, path, path.relative_to(root).as_posix(), label) for i, (label, path) in enumerate(found)]


def read_manifest(path: str) -> dict[str, dict]:
    """``--captions`` CSV (header row) or JSONL -> {path relative to SRC: {"caption": str, "class": str | None}}."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--captions {path!r} does not exist; expected a .csv or .jsonl file (path, caption[, class])")
    rows: list[tuple[str, dict]] = []
    if file.suffix.lower() == ".csv":
        with file.open(newline="", encoding="utf-8-sig") as f:
            rows = [(f"row {n}", row) for n, row in enumerate(csv.DictReader(f), start=2)]
    elif file.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as exn:
                    raise ValueError(f"--captions {path}: line {n} is not JSON ({exn.msg}); expected one object per line")
    else:
        raise ValueError(f"--captions {path!r}: expected a .csv or .jsonl file, got {file.suffix or 'no extension'!r}")
    manifest = {}
    for where, row in rows:
        caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not row.get("path") or not isinstance(caption, str):
            raise ValueError(f"--captions {path}: {where} needs 'path' and 'caption' (or 'text'); got {row!r}")
        label = row.get("class") or None
        manifest[PurePosixPath(str(row["path"]).replace("\\", "/")).as_posix()] = {"caption": caption.strip(),
                                                                                    "class": label and str(label)}
    return manifest


def sidecar_caption(path: Path) -> str | None:
    """The caption of ``<name>.txt`` or ``<name>.json`` ({"caption": ...} / {"text": ...}) beside a video, if any."""
    text = path.with_suffix(".txt")
    if text.is_file():
        return text.read_text(encoding="utf-8").strip()
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            value = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exn:
            log.warning("ignoring caption file %s: not JSON (%s)", meta, exn)
            return None
        caption = value.get("caption", value.get("text")) if isinstance(value, dict) else None
        return caption.strip() if isinstance(caption, str) else None
    return None


def label_and_caption(root: Path, classes: list[str], videos: list[VideoFile], manifest: dict[str, dict]) -> list[str]:
    """Fill each video's caption (and, from a manifest, its class); returns the class names."""
    absolute = {str((root / v.name).resolve()): v.name for v in videos}
    rows = {absolute.get(str(Path(name).resolve()), name) if Path(name).is_absolute() else name: row
            for name, row in manifest.items()}
    unmatched = sorted(set(rows) - {v.name for v in videos})
    if unmatched:
        log.warning("--captions: %d rows name no video in %s: %s", len(unmatched), root, ", ".join(unmatched[:SHOWN_PATHS]))
    named = {v.name: rows[v.name]["class"] for v in videos if v.name in rows and rows[v.name]["class"]}
    if classes:
        for name, label in named.items():
            folder = name.split("/", 1)[0]
            if label != folder:
                raise ValueError(f"--captions: {name} has class {label!r} but lies in the class folder {folder!r}")
    else:
        classes = sorted(set(named.values()))
    for video in videos:
        row = rows.get(video.name)
        video.caption = row["caption"] if row else sidecar_caption(video.path)
        if video.name in named and video.label is None:
            video.label = classes.index(named[video.name])
    return classes


def in_holdout(name: str, fraction: float) -> bool:
    """Whether the video at ``name`` (relative to SRC) is held out: sha256 of the path, as a fraction of 2^64, < fraction."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def read_one(task: tuple[int, str, ClipOptions]) -> tuple[int, VideoClips | None, str, str]:
    """Worker: (index, clips or None, skip reason, detail); never raises for a bad file."""
    index, path, options = task
    try:
        return index, read_clips(path, options), "", ""
    except SkippedVideo as exn:
        return index, None, exn.reason, str(exn)
    except Exception as exn:  # noqa: BLE001 - anything a broken file raises means "unreadable", named and counted
        return index, None, "unreadable", str(exn).strip() or type(exn).__name__


def init_worker() -> None:
    import torch  # as DataLoader workers do: one thread each, and no OpenMP pool inherited across fork

    torch.set_num_threads(1)


def write_video_clips(
    src: str, out: str, options: ClipOptions, captions: str | None = None, holdout: float = 0.0, workers: int = 1,
    shard_size: int = 100, prefix: str = "video", progress: bool = True,
) -> Report:
    """Cut every video of ``src`` into clips and write them as shards to ``out`` (see the module docstring)."""
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout: expected a fraction in [0, 1), got {holdout}")
    if workers < 1 or shard_size < 1:
        raise ValueError(f"--workers and --shard-size: expected >= 1, got {workers} and {shard_size}")
    root = Path(src)
    classes, videos = list_videos(src)
    classes = label_and_caption(root, classes, videos, read_manifest(captions) if captions else {})
    folders = {split: Path(out) / split for split in SPLITS} if holdout > 0 else {"train": Path(out)}
    for folder in folders.values():
        if any(folder.glob(f"{prefix}-*.tar")):
            raise ValueError(f"{folder} already holds {prefix}-*.tar shards; write to an empty folder (or remove them)")
    for folder in folders.values() if classes else ():
        write_classes(str(folder), classes)
    order = list(videos)
    random.Random(0).shuffle(order)
    tasks = [(video.index, str(video.path), options) for video in order]
    report = Report(files=len(videos), clips={split: 0 for split in folders})
    started = time.perf_counter()
    writers = {split: ShardWriter(os.path.join(folder, f"{prefix}-%06d.tar"), maxcount=shard_size)
               for split, folder in folders.items()}
    pool = None
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.Pool(min(workers, len(tasks)), initializer=init_worker)
            results = pool.imap(read_one, tasks, chunksize=1)  # in task order, whatever finishes first
        else:
            results = map(read_one, tasks)
        bar = tqdm(results, total=len(tasks), desc=f"shards {src}", unit="video", disable=not progress)
        for index, result, reason, detail in bar:
            video = videos[index]
            if result is None:
                log.warning("skipping %s (%s): %s", video.path, reason, detail)
                report.skipped.setdefault(reason, []).append(video.name)
                continue
            split = "holdout" if holdout > 0 and in_holdout(video.name, holdout) else "train"
            for clip in result.clips:
                writers[split].write(clip_sample(video, clip, options, classes))
            report.clips[split] += len(result.clips)
            report.videos += bool(result.clips)
            report.static += result.static
            report.silent += result.silent
            bar.set_postfix(clips=sum(report.clips.values()))
    finally:
        if pool is not None:
            pool.terminate()
        for writer in writers.values():
            report.paths += writer.close()
    report.seconds = time.perf_counter() - started
    if not report.paths:
        raise ValueError(f"no clips written from {src}: {report.summary()}")
    return report


def clip_sample(video: VideoFile, clip, options: ClipOptions, classes: list[str]) -> dict:
    """The shard sample of one clip: npy, json, and cls, txt, wav where there are."""
    meta = {"path": video.name, "start": round(float(clip.start), 6), "end": round(float(clip.start + options.seconds), 6),
            "fps": options.fps, "frames": options.frames}
    sample = {"__key__": f"{video.index:06d}-{clip.index:04d}", "npy": clip.frames, "json": meta}
    if video.label is not None:
        sample["cls"], meta["class"] = video.label, classes[video.label]
    if video.caption:
        sample["txt"] = video.caption
    if clip.audio is not None:
        from datamodules.audio import encode_wav

        sample["wav"], meta["sample_rate"] = encode_wav(clip.audio, options.sample_rate), options.sample_rate
    return sample
