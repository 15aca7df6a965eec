"""Read colour, shape and position of a synthetic shape image back and compare them with its caption.

The synthetic image captions (``datamodules.synthetic.synthetic_images``) read
``"a <size> <colour> <shape> <position>"``, e.g. "a small red circle at the top left". A generated
image is measured as one frame of the video checker (app/evaluation/checkers/video.py): foreground,
sub-pixel coverage, best-IoU shape template, nearest palette colour. Its position is the centre
of the fitted template (the centroid moved back by the shape's own centroid offset, so a
triangle's heavy base does not pull it down) in the words the captions use (``position_words``).

``caption_scores`` gives, over images and their captions, the accuracy of each attribute and
``caption_accuracy``: all three right. An image with no single object of plausible size gets
nothing right. Size words are not scored: they split a continuous scale at hard thresholds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from app.evaluation.checkers.video import clip_attributes, template_stats
from datamodules.synthetic import COLOURS, SHAPES, position_words

CAPTION = re.compile(
    rf"^a (?:\w+ )?(?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) (?P<position>.+)$"
)
ATTRIBUTES = ("colour", "shape", "position")


def parse_caption(caption: str) -> dict[str, str] | None:
    """{"colour", "shape", "position"} of a synthetic caption, or None for any other text."""
    match = CAPTION.match(caption.strip())
    return match.groupdict() if match else None


def image_attributes(image: np.ndarray) -> dict[str, str | None]:
    """colour, shape and position words of one uint8 (H, W, 3) image (None where there is no object)."""
    a = clip_attributes(image[None])
    if not a["valid"][0] or a["shape"] < 0:
        return {"colour": None, "shape": None, "position": None}
    unit_area, offset = template_stats()
    scale = np.sqrt(a["areas"][0] / unit_area[a["shape"]])
    cx, cy = a["centroids"][0] - offset[a["shape"]] * scale
    return {"colour": a["colour"], "shape": SHAPES[a["shape"]], "position": position_words(float(cx), float(cy))}


def caption_scores(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy and caption_accuracy (all three) of uint8 (H, W, 3) images against synthetic captions."""
    if len(images) != len(captions):
        raise ValueError(f"caption_scores: {len(images)} images but {len(captions)} captions")
    wanted = [parse_caption(c) for c in captions]
    if not wanted or any(w is None for w in wanted):
        bad = next((c for c, w in zip(captions, wanted) if w is None), "")
        raise ValueError(f"caption_scores: {bad!r} is not a synthetic shape caption ('a <size> <colour> <shape> <position>')")
    found = [image_attributes(np.asarray(im)) for im in images]
    hits = np.array([[f[k] == w[k] for k in ATTRIBUTES] for f, w in zip(found, wanted)])  # (N, 3)
    return {**{f"{k}_accuracy": float(hits[:, i].mean()) for i, k in enumerate(ATTRIBUTES)},
            "caption_accuracy": float(hits.all(axis=1).mean())}
