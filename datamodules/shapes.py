"""3D shape data: procedural solids as shape samples, and the transforms that read shape samples.

Mesh folders -> the same samples: datamodules/ingest_mesh.py.

A shape sample holds a surface point cloud, occupancy queries with inside labels, and the usual
conditioning:

    {"__key__", "points.npy": float32 (N, 3), "queries.npy": float32 (M, 3), "occ.npy": uint8 (M,),
     "cls": int, "txt": str, "json": dict}

Everything lives in the cube [-1, 1]^3 with the shape inside the ball of radius 0.9. Half of the
queries are uniform in the cube, half lie near the surface (a surface point plus Gaussian noise,
sigma 0.01 or 0.05): uniform queries teach the coarse volume, near ones the exact boundary
(3DShape2VecSet). Axes: z is up; synthetic solids stand upright (random turn about z, tilt up
to 20 degrees), so captions such as "tall" keep their meaning.

Solids (datamodules/solids.py) are exact signed distance functions, so inside tests and surface
distances are analytic. Legend: N surface points, M queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from datamodules.decoders import BadSample
from datamodules.solids import SOLIDS, caption, inside, sdf, solid_of, surface, volume  # noqa: F401 (re-exported)
from datamodules.transforms import SampleTransform

BOUND = 0.9
"""Every shape lies inside the ball of this radius (so inside the cube [-1, 1]^3 with a margin)."""
RADIUS_RANGE = (0.45, 0.85)
"""Bounding radius of a synthetic solid about its own centre."""
MAX_TILT = np.deg2rad(20.0)
NEAR_SIGMAS = (0.01, 0.05)
"""Noise scales of the near-surface queries (half of them each)."""


# ---------------------------------------------------------------- random solids


def upright_rotation(rng: np.random.Generator, max_tilt: float = MAX_TILT) -> np.ndarray:
    """(3, 3): a uniform turn about z, then a tilt of up to ``max_tilt`` about a random horizontal axis."""
    yaw = rng.uniform(0, 2 * np.pi)
    cz, sz = np.cos(yaw), np.sin(yaw)
    turn = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    angle, heading = rng.uniform(0, max_tilt), rng.uniform(0, 2 * np.pi)
    k = np.array([np.cos(heading), np.sin(heading), 0.0])  # horizontal unit axis
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    tilt = np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx  # Rodrigues
    return tilt @ turn


def _scaled(params: dict, s: float) -> dict:
    return {k: (np.asarray(v) * s).tolist() if isinstance(v, list) else v * s for k, v in params.items()}


def random_solid(rng: np.random.Generator) -> tuple[int, dict]:
    """(class index, params): a random solid, size and pose inside the ball of radius BOUND."""
    label = int(rng.integers(len(SOLIDS)))
    solid = SOLIDS[label]
    kind = solid_of(solid)
    dims = kind.proportions(rng)
    radius = float(rng.uniform(*RADIUS_RANGE))
    dims = _scaled(dims, radius / kind.bounding_radius(dims))
    direction = rng.standard_normal(3)
    offset = (BOUND - radius) * rng.random() ** (1 / 3) * direction / np.linalg.norm(direction)  # uniform in a ball
    return label, {"solid": solid, **dims, "rotation": upright_rotation(rng).tolist(), "center": offset.tolist()}


def near_surface_queries(surface_points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Surface points plus Gaussian noise, half with each sigma of NEAR_SIGMAS, clipped to the cube."""
    n = len(surface_points)
    sigma = np.where(np.arange(n) < n // 2, NEAR_SIGMAS[0], NEAR_SIGMAS[1])[:, None]
    return np.clip(surface_points + sigma * rng.standard_normal((n, 3)), -1, 1)


def occupancy_sample(key: str, points: np.ndarray, queries: np.ndarray, occ: np.ndarray, **extra: Any) -> dict:
    """The stored sample format (float32 points and queries, uint8 occupancy)."""
    return {
        "__key__": key,
        "points.npy": points.astype(np.float32),
        "queries.npy": queries.astype(np.float32),
        "occ.npy": occ.astype(np.uint8),
        **extra,
    }


def synthetic_shapes(
    num: int, seed: int = 0, size: int | None = None, points: int = 2048, queries: int = 2048
) -> Iterator[dict]:
    """Yield ``num`` random solids as shape samples; ``cls`` indexes SOLIDS, ``json`` holds the params.

    Sample i depends only on (seed, i). ``size`` is accepted for ``write_synthetic`` (which passes
    a resolution to every kind) and unused: shapes have no pixel size.
    """
    del size
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        label, params = random_solid(rng)
        solid = SOLIDS[label]
        on_surface = surface(solid, params, points + queries - queries // 2, rng)
        q = np.concatenate([rng.uniform(-1, 1, (queries // 2, 3)), near_surface_queries(on_surface[points:], rng)])
        yield occupancy_sample(
            f"{i:08d}", on_surface[:points], q, inside(solid, params, q),
            cls=label, txt=caption(solid, params), json=params,
        )


# ---------------------------------------------------------------- transforms


def checked_array(decoded: dict, field: str, where: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """decoded[field] checked to be a finite numeric array of ``shape`` (None = any length)."""
    if field not in decoded:
        found = sorted(k for k in decoded if not k.startswith("__"))
        raise BadSample(f"{where}: missing field {field!r}, found {found}")
    a = decoded[field]
    if (not isinstance(a, np.ndarray) or a.ndim != len(shape) or a.dtype.kind not in "biuf"
            or any(want is not None and got != want for got, want in zip(a.shape, shape))):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise BadSample(f"{where}: {field}: expected a numeric {want} array, got {got}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise BadSample(f"{where}: {field} holds NaN or inf")
    return a


def _subset(n_stored: int, n: int) -> torch.Tensor:
    """n random indices into n_stored items: without replacement when there are enough, else with."""
    if n_stored >= n:
        return torch.randperm(n_stored)[:n]
    return torch.randint(n_stored, (n,))


class ShapeTransform(SampleTransform):
    """Shape sample -> ``points`` (N, 3), ``queries`` (M, 3), ``occ`` float32 (M,) in {0, 1}.

    Fixed-size random subsets of the stored arrays (so batches stack; drawn with replacement when
    a sample stores fewer), from the torch RNG of the dataloader worker.

    Args:
        points: Surface points given to the encoder.
        queries: Occupancy query points (with labels) for the loss.
    """

    def __init__(self, points: int = 2048, queries: int = 1024):
        if points <= 0 or queries <= 0:
            raise ValueError(f"ShapeTransform: points and queries must be positive, got {points}, {queries}")
        self.points, self.queries = points, queries

    def __call__(self, decoded: dict) -> dict:
        where = self.where(decoded)
        pts = checked_array(decoded, "points.npy", where, (None, 3))
        q = checked_array(decoded, "queries.npy", where, (None, 3))
        occ = checked_array(decoded, "occ.npy", where, (len(q),))
        if len(pts) == 0 or len(q) == 0:
            raise BadSample(f"{where}: empty points.npy or queries.npy")
        if not np.isin(occ, (0, 1)).all():
            raise BadSample(f"{where}: occ.npy: expected 0/1 labels, got values {np.unique(occ)[:5].tolist()}")
        pi, qi = _subset(len(pts), self.points), _subset(len(q), self.queries)
        return {
            "points": torch.from_numpy(np.asarray(pts, np.float32))[pi],
            "queries": torch.from_numpy(np.asarray(q, np.float32))[qi],
            "occ": torch.from_numpy(np.asarray(occ, np.float32))[qi],
            **self.conditioning(decoded),
        }

    def cost(self, sample: dict) -> int:
        return self.points


class LatentTransform(SampleTransform):
    """Pre-encoded latent set -> ``x`` float32 (K, d) from ``latent.npy`` (see app/shape_latents.py).

    Args:
        latent_key: The sample field holding the (K, d) latent array.
    """

    def __init__(self, latent_key: str = "latent.npy"):
        self.latent_key = latent_key

    def __call__(self, decoded: dict) -> dict:
        z = checked_array(decoded, self.latent_key, self.where(decoded), (None, None))
        return {"x": torch.from_numpy(np.asarray(z, np.float32)), **self.conditioning(decoded)}

    def cost(self, sample: dict) -> int:
        return len(sample["x"])  # K latent tokens


class SurfacePoints(SampleTransform):
    """Shape or latent sample -> ``x`` float32 (N, 3): its first N stored surface points (deterministic,
    for metrics; the stored points are already a random sample of the surface). A sample storing
    fewer repeats them, so batches stack.

    Args:
        points: Surface points per shape.
    """

    def __init__(self, points: int = 1024):
        if points <= 0:
            raise ValueError(f"SurfacePoints: points must be positive, got {points}")
        self.points = points

    def __call__(self, decoded: dict) -> dict:
        where = self.where(decoded)
        pts = checked_array(decoded, "points.npy", where, (None, 3))
        if len(pts) == 0:
            raise BadSample(f"{where}: points.npy is empty")
        return {"x": torch.from_numpy(np.resize(np.asarray(pts, np.float32), (self.points, 3))),
                **self.conditioning(decoded)}

    def cost(self, sample: dict) -> int:
        return self.points
