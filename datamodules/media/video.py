"""Video as files: MP4 (H.264, optional AAC soundtrack) plus a PNG filmstrip of the clips.

Letters: B batch, T frames, H/W height/width, S audio samples, K audio channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from datamodules.media.image import image_grid, to_uint8_images

AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}
AAC_SAMPLE_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
"""The rates the AAC encoder accepts; resample to one of these before muxing."""


def write_mp4(
    frames: np.ndarray,
    path: str | Path,
    fps: int = 8,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    upscale: int = 1,
) -> Path:
    """Write uint8 (T, H, W, 3) frames as H.264/yuv420p MP4, with ``audio`` (S,) or (S, K) in [-1, 1] as AAC.

    Frames are enlarged ``upscale`` times by nearest neighbour (16 px clips are too small to
    watch) and edge-padded to even sides, which yuv420p needs.
    """
    is_clip = isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    if not is_clip or not frames.size:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"write_mp4: frames: expected a non-empty uint8 (T, H, W, 3) array, got {got}")
    if fps <= 0 or upscale < 1:
        raise ValueError(f"write_mp4: fps must be positive and upscale at least 1, got fps={fps}, upscale={upscale}")
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # (T, even H, even W, 3)
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio[:, None] if audio.ndim == 1 else audio  # (S, K)
        if audio.ndim != 2 or audio.shape[1] not in AUDIO_LAYOUTS or not len(audio):
            raise ValueError(f"write_mp4: audio: expected (samples,) or (samples, 1 or 2 channels), got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise ValueError("write_mp4: audio holds NaN or inf")
        if sample_rate not in AAC_SAMPLE_RATES:
            raise ValueError(f"write_mp4: sample_rate: expected one of {AAC_SAMPLE_RATES} with audio, got {sample_rate}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import av  # lazily: PyAV (bundled ffmpeg) only when a clip is written

    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"crf": "12"}  # near-lossless: the clips are tiny
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=int(sample_rate))
            sound.layout = AUDIO_LAYOUTS[audio.shape[1]]
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            planar = np.ascontiguousarray(np.clip(audio, -1.0, 1.0).T)  # (K, S), fltp is planar
            chunk = av.AudioFrame.from_ndarray(planar, format="fltp", layout=AUDIO_LAYOUTS[audio.shape[1]])
            chunk.sample_rate, chunk.pts = int(sample_rate), 0
            container.mux(sound.encode(chunk))  # the encoder re-chunks into AAC frames of 1024
            container.mux(sound.encode(None))
    return path


def save_videos(
    x: Tensor, out_dir: str | Path, prefix: str = "sample", fps: int = 8, upscale: int = 4, grid_frames: int = 8,
    audio: Tensor | None = None, sample_rate: int | None = None,
) -> list[Path]:
    """Write (B, 3, T, H, W) in [-1, 1] as one MP4 per clip, then a PNG filmstrip grid; returns the paths, grid last.

    The grid has one row per clip showing its first ``grid_frames`` frames, enlarged ``upscale`` times.
    ``audio`` (B, S) in [-1, 1] at ``sample_rate``: each clip's soundtrack, muxed into its MP4 as AAC.
    """
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"save_videos: expected a (B, 3, T, H, W) tensor, got shape {tuple(x.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b, _, t, h, w = x.shape
    clips = to_uint8_images(x.transpose(1, 2).reshape(b * t, 3, h, w)).reshape(b, t, h, w, 3)
    sounds = [None] * b if audio is None else audio.detach().float().cpu().numpy()
    paths = [write_mp4(clip, out / f"{prefix}-{i:04d}.mp4", fps=fps, audio=sound, sample_rate=sample_rate, upscale=upscale)
             for i, (clip, sound) in enumerate(zip(clips, sounds))]
    shown = min(t, grid_frames)
    grid = Image.fromarray(image_grid(clips[:, :shown].reshape(b * shown, h, w, 3), nrow=shown))
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    path = out / f"{prefix}-grid.png"
    grid.save(path)
    return [*paths, path]
