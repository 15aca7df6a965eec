"""Read the procedural attributes of synthetic bouncing-shape clips back, without learning.

A generated clip is scored by how well these measurements recover what the synthetic data
(``datamodules.video.synthetic_videos``) put in. Clips are uint8 (T, H, W, 3), square frames.
Letters: B clips, T frames, F valid frames, H/W height/width, S shapes. Positions are
fractions of the side (u right, v down); velocities are fractions of the side per frame.

Per frame:
    foreground   pixels whose largest channel difference from BACKGROUND exceeds
                 FOREGROUND_THRESHOLD (80 of 255: about half the shape's contrast).
    valid        the foreground covers between MIN_AREA and MAX_AREA of the frame. Noise and
                 flat colour (almost all foreground) and empty frames fail this; every other
                 measure below treats an invalid frame as a miss.
    coverage     per pixel, its contrast over that of a fully covered pixel (the 90th
                 percentile of the foreground), clipped to [0, 1], and 0 under half the
                 threshold: the renderer's antialiasing undone, so that area and centroid are
                 sub-pixel (they must be, at 16 px) without faint background noise adding up.
    centroid     coverage-weighted mean (u, v); area the mean coverage (fraction of the frame).
    shape vote   for every shape in SHAPES, a ``shape_mask`` template (coverage, 4x
                 supersampled) whose scale reproduces the measured area and whose own centroid
                 sits on the measured centroid; the vote is the shape with the best soft IoU
                 (sum of minima over sum of maxima) against the coverage.
Per clip:
    shape        the majority vote over valid frames (-1 without any).
    colour       nearest COLOURS entry to the mean foreground colour of the first valid frame;
                 colour_after that of the last valid frame when it differs, else None.
    velocity     per axis, speed = median |step| of the centroid over consecutive valid frames
                 (bounces flip the sign but keep the speed, so the median is a robust fit of
                 the piecewise-linear track), signed like the first non-zero step.
    consistency  fraction of the T-1 consecutive frame pairs where both frames are valid and
                 the foreground of frame t, moved as the synthetic physics would move it,
                 overlaps frame t+1 with IoU > 1/2. The move is the fitted speed along the
                 current direction (initially the velocity's sign; afterwards the sign of the
                 last observed step), reflected off the frame border when the foreground's
                 bounding box would cross it, rounded to whole pixels. It rewards one rigid
                 object moving at a steady speed and bouncing only at the walls; flicker,
                 morphing, growth, jumps and mid-frame reversals fail it. A still object counts
                 as consistent (speed 0); so does a single valid frame.
``video_scores`` averages over clips: ``shape_accuracy`` (clip shape == label),
``temporal_consistency`` (mean consistency) and ``valid_frames`` (fraction of valid frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from datamodules.synthetic import BACKGROUND, COLOURS, SHAPES, shape_mask

FOREGROUND_THRESHOLD = 80
MIN_AREA, MAX_AREA = 0.01, 0.5
SUPERSAMPLE = 4


@cache
def template_stats(resolution: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per shape at scale 1: area as a fraction of the unit square (S,) and centroid offset from the centre (S, 2)."""
    grid = (np.arange(resolution) + 0.5) / resolution
    u, v = np.meshgrid(grid, grid)
    masks = np.stack([shape_mask(shape, u, v, 0.5, 0.5, 1.0) for shape in SHAPES])  # (S, R, R)
    area = masks.mean(axis=(1, 2))
    offset = np.stack([(masks * u).sum((1, 2)), (masks * v).sum((1, 2))], -1) / masks.sum((1, 2))[:, None] - 0.5
    return area, offset


def contrast(clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, H, W): the largest channel difference from BACKGROUND."""
    return np.abs(clip.astype(np.int16) - np.array(BACKGROUND, np.int16)).max(-1)


def foreground(clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> bool (T, H, W): pixels far from BACKGROUND."""
    return contrast(clip) > FOREGROUND_THRESHOLD


def coverage(clip: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3), foreground (T, H, W) -> (T, H, W) in [0, 1]: how much of each pixel the object covers.

    The renderer blends colour over background by coverage, so a pixel's contrast divided by
    the contrast of a fully covered one (the 90th percentile over the foreground) undoes it.
    Pixels under half the foreground threshold count as empty, so that a faintly noisy
    background does not add up to an object.
    """
    diff = contrast(clip)
    full = np.array([np.quantile(d[m], 0.9) if m.any() else 255.0 for d, m in zip(diff, masks)])  # (T,)
    alpha = np.clip(diff / np.maximum(full, 1.0)[:, None, None], 0.0, 1.0)
    return np.where(diff > FOREGROUND_THRESHOLD / 2, alpha, 0.0)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of masks over the last two axes, soft for coverages in [0, 1] (0 where both are empty)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    inter, union = np.minimum(a, b).sum((-2, -1)), np.maximum(a, b).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(H, W) mask moved by (dy, dx) whole pixels, filling with False (no wrap-around)."""
    h, w = mask.shape
    dy, dx = int(np.clip(dy, -h, h)), int(np.clip(dx, -w, w))
    out = np.zeros_like(mask)
    source = mask[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = source
    return out


def shape_votes(alpha: np.ndarray, centroids: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Best-IoU shape index per frame: coverage (F, H, W), centroids (F, 2), areas (F,) -> (F,)."""
    side = alpha.shape[-1]
    n = side * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n
    u, v = np.meshgrid(grid, grid)  # (n, n)
    unit_area, offset = template_stats()
    scores = []
    for s, name in enumerate(SHAPES):
        scale = np.sqrt(areas / unit_area[s])  # (F,)
        cx, cy = (centroids - offset[s] * scale[:, None]).T  # template centre that puts its centroid on the measured one
        cover = shape_mask(name, u, v, cx[:, None, None], cy[:, None, None], scale[:, None, None])  # (F, n, n)
        template = cover.reshape(-1, side, SUPERSAMPLE, side, SUPERSAMPLE).mean((2, 4))  # (F, H, W) coverage
        scores.append(iou(template, alpha))
    return np.argmax(np.stack(scores), axis=0)


def motion_consistency(
    masks: np.ndarray, valid: np.ndarray, centroids: np.ndarray, direction: np.ndarray, speed: np.ndarray
) -> float:
    """Fraction of consecutive pairs whose foreground the constant-velocity, wall-bouncing prediction matches.

    masks (T, H, W), valid (T,), centroids (T, 2) as (u, v); direction (2,) the initial signs and
    speed (2,) the fitted speed, per axis in fractions of the side per frame.
    """
    t, side = len(masks), masks.shape[-1]
    move = speed * side  # (2,) pixels per frame
    direction = direction.copy()
    hits = []
    for i in range(t - 1):
        if not (valid[i] and valid[i + 1]):
            hits.append(False)
            continue
        rows, cols = np.nonzero(masks[i])
        ahead, behind = side - 1 - np.array([cols.max(), rows.max()]), np.array([cols.min(), rows.min()])
        room = np.where(direction > 0, ahead, behind)  # (2,) free pixels before the wall in the direction of motion
        bounced = move > room + 0.5
        step = direction * np.where(bounced, 2 * room - move, move)  # reflect off the wall: what is left comes back
        predicted = shift(masks[i], round(step[1]), round(step[0]))
        hits.append(bool(iou(predicted, masks[i + 1]) > 0.5))
        observed = centroids[i + 1] - centroids[i]
        expected = np.where(bounced, -direction, direction)
        direction = np.where(np.abs(observed) > 1e-9, np.sign(observed), expected)  # follow what happened
    return float(np.mean(hits)) if hits else float(valid.all())


def nearest_colour(rgb: np.ndarray) -> str:
    names = sorted(COLOURS)
    palette = np.array([COLOURS[name] for name in names], np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(-1)))]


def clip_attributes(clip: np.ndarray) -> dict:
    """Measurements of one uint8 (T, H, W, 3) clip; see the module docstring."""
    t, h, w, _ = clip.shape
    masks = foreground(clip)  # (T, H, W)
    valid = (masks.mean((1, 2)) >= MIN_AREA) & (masks.mean((1, 2)) <= MAX_AREA)
    alpha = coverage(clip, masks)  # (T, H, W): sub-pixel area and centroid, which matter at 16 px
    areas = alpha.mean((1, 2))  # (T,)
    grid = (np.arange(h) + 0.5) / h
    u, v = (alpha * grid[None, None, :]).sum((1, 2)), (alpha * grid[None, :, None]).sum((1, 2))
    centroids = np.stack([u, v], -1) / np.maximum(alpha.sum((1, 2)), 1e-12)[:, None]  # (T, 2) as (u, v)
    centroids[~valid] = np.nan

    votes = np.full(t, -1)
    if valid.any():
        votes[valid] = shape_votes(alpha[valid], centroids[valid], areas[valid])
    shape = int(np.bincount(votes[valid], minlength=len(SHAPES)).argmax()) if valid.any() else -1

    colours = [nearest_colour(clip[i][masks[i]].mean(0)) for i in np.flatnonzero(valid)]
    colour = colours[0] if colours else None
    colour_after = colours[-1] if colours and colours[-1] != colour else None

    steps = np.diff(centroids[valid], axis=0)  # (F-1, 2)
    speed = np.median(np.abs(steps), axis=0) if len(steps) else np.zeros(2)
    first = np.array([next((np.sign(s) for s in steps[:, axis] if abs(s) > 1e-9), 0.0) for axis in range(2)])
    velocity = (float(speed[0] * first[0]), float(speed[1] * first[1]))
    consistency = motion_consistency(masks, valid, centroids, first, speed)

    return {
        "shape": shape, "votes": votes, "colour": colour, "colour_after": colour_after,
        "valid": valid, "areas": areas, "centroids": centroids, "velocity": velocity, "consistency": consistency,
    }


def video_attributes(clips: np.ndarray | Sequence[np.ndarray]) -> list[dict]:
    """uint8 (B, T, H, W, 3) or a list of (T, H, W, 3) clips -> one dict per clip: shape, votes, colour,
    colour_after, valid, areas, centroids, velocity, consistency (see the module docstring)."""
    out = []
    for i, clip in enumerate(clips):
        if not isinstance(clip, np.ndarray) or clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
            got = f"{clip.dtype} {clip.shape}" if isinstance(clip, np.ndarray) else type(clip).__name__
            raise ValueError(f"video_attributes: clip {i}: expected a uint8 (T, H, W, 3) array, got {got}")
        if clip.shape[1] != clip.shape[2] or not clip.shape[0]:
            raise ValueError(f"video_attributes: clip {i}: expected square frames and at least one frame, got {clip.shape}")
        out.append(clip_attributes(clip))
    return out


def video_scores(clips: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> dict[str, float]:
    """``shape_accuracy``, ``temporal_consistency`` and ``valid_frames`` of clips against their shape labels."""
    attributes = video_attributes(clips)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(attributes):
        raise ValueError(f"video_scores: labels: expected {len(attributes)} labels, one per clip, got {len(labels)}")
    return {
        "shape_accuracy": float(np.mean([a["shape"] == int(y) for a, y in zip(attributes, labels)])),
        "temporal_consistency": float(np.mean([a["consistency"] for a in attributes])),
        "valid_frames": float(np.mean(np.concatenate([a["valid"] for a in attributes]))),
    }
