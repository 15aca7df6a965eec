"""Sample-quality metrics on feature vectors: Fréchet distance, k-NN precision/recall, accuracy.

Letters: N real samples, M generated samples, D feature dimensions.

Every function takes features from some fixed embedding network (for images our FeatureNet,
app/evaluation/feature_net.py) as torch tensors or numpy arrays, and computes in float64: the Fréchet
distance subtracts traces of nearly equal size, which float32 loses.

- Fréchet distance (Heusel et al. 2017, "FID" with Inception features): the 2-Wasserstein
  distance between Gaussians fitted to the two feature sets,
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``. Lower is better; 0 for identical sets.
- Precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
  around its points with radius the distance to the point's k-th nearest neighbour in the same
  set. Precision = the fraction of generated samples inside the real manifold (are samples
  realistic?); recall = the fraction of real samples inside the generated manifold (are all
  modes covered?).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)): mean and unbiased covariance (N - 1), as pytorch-fid."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats: expected (N, D) features with N >= 2, got shape {f.shape}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)  # (D, D)
    return mu, sigma


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; rounding-level negative eigenvalues -> 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    S1 S2 is not symmetric, and ``scipy.linalg.sqrtm`` of it returns small imaginary parts (and
    fails on singular covariances, e.g. N < D) that pytorch-fid has to discard with a tolerance.
    Here we use that S1 S2 = S1^{1/2} (S1^{1/2} S2 S1^{1/2}) S1^{-1/2} is similar to the
    symmetric PSD matrix C = S1^{1/2} S2 S1^{1/2}: both have the same real, non-negative
    eigenvalues lambda_i, so Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i) exactly, computed with
    `eigvalsh` on C. No complex arithmetic and no imaginary parts arise; eigenvalues below 0
    only by rounding are clipped to 0. (Valid for singular S1 too, by continuity.)
    """
    s1, s2 = _f64(sigma1), _f64(sigma2)
    root1 = _psd_sqrt(s1)
    c = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((c + c.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}): the Fréchet (2-Wasserstein) distance
    between N(mu1, S1) and N(mu2, S2). Clipped at 0 (it can only go below by rounding)."""
    m1, m2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu {m1.shape} {m2.shape}, sigma {s1.shape} {s2.shape}")
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(value), 0.0)


def frechet_from_features(a: ArrayLike, b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ---------------------------------------------------------------- precision / recall


def _distances(a: Tensor, b: Tensor, chunk: int) -> list[Tensor]:
    """Pairwise Euclidean distances, (rows of a) x b, in row chunks (bounded memory)."""
    return [torch.cdist(a[i : i + chunk], b) for i in range(0, a.shape[0], chunk)]


def knn_radii(x: ArrayLike, k: int = 3, chunk: int = 1024) -> Tensor:
    """(N,) distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    x64 = torch.as_tensor(_f64(x))
    if x64.ndim != 2 or x64.shape[0] <= k:
        raise ValueError(f"knn_radii: need (N, D) points with N > k={k}, got shape {tuple(x64.shape)}")
    # the k+1-th smallest distance in a row: the smallest is the point itself (0)
    return torch.cat([d.kthvalue(k + 1, dim=1).values for d in _distances(x64, x64, chunk)])


def manifold_coverage(points: ArrayLike, centres: ArrayLike, radii: Tensor, chunk: int = 1024) -> float:
    """Fraction of `points` inside at least one ball (centres[i], radii[i]) (boundary included)."""
    p, c = torch.as_tensor(_f64(points)), torch.as_tensor(_f64(centres))
    inside = [(d <= radii[None, :]).any(dim=1) for d in _distances(p, c, chunk)]
    return float(torch.cat(inside).double().mean())


def knn_precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` (M, D) against `real` (N, D).

    Both are in [0, 1]; k=3 is the paper's choice. Cost O(N M D) time, chunked memory."""
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return {"precision": precision, "recall": recall}


def accuracy(logits_or_preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of correct predictions; (N, C) logits are reduced by argmax, (N,) are predictions."""
    pred = torch.as_tensor(logits_or_preds).detach().cpu()
    target = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    pred = pred.long().reshape(-1)
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"accuracy: {pred.numel()} predictions for {target.numel()} labels; expected as many, at least 1")
    return float((pred == target).double().mean())
