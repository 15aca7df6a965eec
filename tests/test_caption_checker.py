"""The caption-following checker for synthetic shape images: real images score near 1, images under
other captions near chance, noise 0; parsing of the caption grammar."""

from __future__ import annotations

import numpy as np
import pytest

from app.evaluation.checkers.image import caption_scores, image_attributes, parse_caption
from datamodules.synthetic import synthetic_images


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return list(synthetic_images(200, image_size=16, seed=11))


def test_parse_caption() -> None:
    assert parse_caption("a small red circle at the top left") == {"colour": "red", "shape": "circle",
                                                                     "position": "at the top left"}
    assert parse_caption("a large blue cross in the centre")["position"] == "in the centre"
    assert parse_caption("a dog on a sofa") is None


def test_real_images_follow_their_captions(samples) -> None:
    scores = caption_scores([s["png"] for s in samples], [s["txt"] for s in samples])
    assert scores["colour_accuracy"] > 0.97 and scores["shape_accuracy"] > 0.97
    assert scores["position_accuracy"] > 0.93 and scores["caption_accuracy"] > 0.93  # words split positions at hard thresholds
    s = samples[0]
    assert image_attributes(s["png"]) == {k: v for k, v in parse_caption(s["txt"]).items()}


def test_other_captions_and_noise_score_low(samples) -> None:
    images, captions = [s["png"] for s in samples], [s["txt"] for s in samples]
    shuffled = caption_scores(images, captions[1:] + captions[:1])
    assert shuffled["caption_accuracy"] < 0.1 and shuffled["colour_accuracy"] < 0.45  # 4 colours, 4 shapes, 9 places
    rng = np.random.default_rng(0)
    noise = caption_scores([rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in captions[:20]], captions[:20])
    assert noise == {"colour_accuracy": 0.0, "shape_accuracy": 0.0, "position_accuracy": 0.0, "caption_accuracy": 0.0}
    with pytest.raises(ValueError, match="not a synthetic shape caption"):
        caption_scores(images[:1], ["a photo of a cat"])
