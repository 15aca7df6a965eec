"""Sample-quality metrics against closed forms (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from app.evaluation.metrics import (
    accuracy,
    feature_stats,
    frechet_distance,
    frechet_from_features,
    knn_precision_recall,
    trace_sqrt_product,
)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_sets_have_zero_distance() -> None:
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    mu, sigma = feature_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_feature_stats_match_numpy() -> None:
    x = np.random.default_rng(1).normal(size=(50, 4))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_diagonal_gaussians_closed_form() -> None:
    """Diagonal S1, S2 commute: Tr(S1 + S2 - 2 (S1 S2)^{1/2}) = sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_full_covariances_match_scipy_sqrtm() -> None:
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 10), random_spd(rng, 10)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)
    assert trace_sqrt_product(s2, s1) == pytest.approx(expected, rel=1e-9)  # symmetric in its arguments


def test_singular_covariances_more_dims_than_samples() -> None:
    """N < D gives rank-deficient covariances: no NaN, no imaginary parts, still ~0 against itself."""
    x = np.random.default_rng(4).normal(size=(5, 20))
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    y = x + 1.0
    # pure shift: ||1||^2 = D; zero eigenvalues come out ~1e-14, whose square roots leave ~1e-6
    assert frechet_from_features(x, y) == pytest.approx(20.0, abs=1e-5)


def test_shifted_gaussian_samples_give_shift_squared() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    y = torch.randn(20000, 4, generator=gen, dtype=torch.float64) + shift
    assert frechet_from_features(x, y) == pytest.approx(float(shift @ shift), abs=0.03)  # 5.25


def test_precision_recall_identical_sets() -> None:
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(6))
    assert knn_precision_recall(x, x, k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_disjoint_clusters() -> None:
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(200, 3, generator=gen)
    fake = torch.randn(200, 3, generator=gen) + 100.0
    assert knn_precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_generator_covering_half_the_modes() -> None:
    """Real data: 4 far-apart modes; the generator samples 2 of them well: precision ~1, recall ~0.5."""
    gen = torch.Generator().manual_seed(8)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    real = torch.cat([c + torch.randn(250, 2, generator=gen) for c in centres])
    fake = torch.cat([c + torch.randn(500, 2, generator=gen) for c in centres[:2]])
    scores = knn_precision_recall(real, fake)
    assert scores["precision"] > 0.95
    assert scores["recall"] == pytest.approx(0.5, abs=0.03)


def test_accuracy_from_logits_and_predictions() -> None:
    logits = torch.tensor([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0], [0.2, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([0, 1, 1, 1]), np.array([0, 1, 1, 0])) == 0.75
    with pytest.raises(ValueError, match="3 predictions for 4 labels"):
        accuracy(torch.tensor([0, 1, 1]), labels)
