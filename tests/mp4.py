"""Reading MP4 files back in tests (what the sample writers produced)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_mp4(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, float, int | None]:
    """MP4 -> (frames uint8 (T, H, W, 3), audio float32 (S, K) or None, fps, sample_rate or None)."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        sound = container.streams.audio[0] if container.streams.audio else None
        frames, chunks = [], []
        for frame in container.decode(*(s for s in (video, sound) if s is not None)):
            if isinstance(frame, av.VideoFrame):
                frames.append(frame.to_ndarray(format="rgb24"))
            else:  # planar (K, S_i) or packed (1, S_i * K) -> (S_i, K)
                chunk = frame.to_ndarray()
                chunks.append(chunk.T if frame.format.is_planar else chunk.reshape(-1, len(frame.layout.channels)))
        fps = float(video.average_rate or video.base_rate)
        if sound is None:
            return np.stack(frames), None, fps, None
        return np.stack(frames), np.concatenate(chunks).astype(np.float32), fps, int(sound.rate)
