"""Point-cloud scores for generated 3D shapes: Chamfer distance, COV / MMD, 1-NN class accuracy.

Convention (PointFlow, LION): the Chamfer distance of point sets A and B is the mean SQUARED
Euclidean distance from each point of A to its nearest point of B, plus the same from B to A:

    CD(A, B) = mean_a min_b |a - b|^2 + mean_b min_a |a - b|^2

(no square root, both directions summed, not averaged). Identical sets score 0.
Set scores, with generated shapes G and reference shapes R (PointFlow's definitions):
    COV  fraction of reference shapes that are the nearest reference (by CD) of some generated shape;
         high when generation covers the data's variety (1 is best).
    MMD  mean over reference shapes of the CD to the closest generated shape; low when every real
         shape has a faithful generated counterpart (0 is best).
Point sets are (N, 3) arrays; compare sets sampled with the same number of points and normalisation.
Nearest neighbours come from scipy's k-d tree, so a comparison costs O((N + M) log(N + M)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree


def _points(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0 or not np.isfinite(a).all():
        raise ValueError(f"{name}: expected a finite, non-empty (N, 3) point set, got shape {a.shape}")
    return a


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Chamfer distance (module docstring) of point sets a (N, 3) and b (M, 3)."""
    a, b = _points(a, "chamfer a"), _points(b, "chamfer b")
    d_ab, _ = cKDTree(b).query(a)
    d_ba, _ = cKDTree(a).query(b)
    return float(np.mean(d_ab**2) + np.mean(d_ba**2))


def pairwise_chamfer(generated: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> np.ndarray:
    """(G, R) matrix of Chamfer distances, each k-d tree built once."""
    gen = [_points(g, f"generated[{i}]") for i, g in enumerate(generated)]
    ref = [_points(r, f"reference[{j}]") for j, r in enumerate(reference)]
    if not gen or not ref:
        raise ValueError(f"pairwise_chamfer: need shapes on both sides, got {len(gen)} generated, {len(ref)} reference")
    gen_trees, ref_trees = [cKDTree(g) for g in gen], [cKDTree(r) for r in ref]
    out = np.empty((len(gen), len(ref)))
    for i, (g, gt) in enumerate(zip(gen, gen_trees)):
        for j, (r, rt) in enumerate(zip(ref, ref_trees)):
            out[i, j] = np.mean(rt.query(g)[0] ** 2) + np.mean(gt.query(r)[0] ** 2)
    return out


def coverage_mmd(generated: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict[str, float]:
    """{"coverage", "mmd"} of generated shapes against reference shapes (module docstring)."""
    return coverage_mmd_from(pairwise_chamfer(generated, reference))


def coverage_mmd_from(d: np.ndarray) -> dict[str, float]:
    """{"coverage", "mmd"} from a (G, R) generated-to-reference Chamfer matrix (computed once by a caller
    that needs more scores from it)."""
    covered = np.unique(d.argmin(axis=1))
    return {"coverage": len(covered) / d.shape[1], "mmd": float(d.min(axis=0).mean())}


def shape_class_accuracy(
    generated: Sequence[np.ndarray], labels: Sequence[int], reference: Sequence[np.ndarray],
    reference_labels: Sequence[int],
) -> float:
    """Fraction of generated shapes whose nearest reference shape (by Chamfer) has the label they were asked for."""
    if len(labels) != len(generated) or len(reference_labels) != len(reference):
        raise ValueError(f"shape_class_accuracy: {len(generated)} generated shapes with {len(labels)} labels, "
                         f"{len(reference)} reference shapes with {len(reference_labels)} labels; expected one each")
    nearest = pairwise_chamfer(generated, reference).argmin(axis=1)  # (G,)
    return float(np.mean(np.asarray(reference_labels)[nearest] == np.asarray(labels)))
