"""3D shape data: procedural solids, mesh folders -> shards, and the transforms that read them.

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
distances are analytic. Legend: N surface points, M queries, V vertices,
F triangles.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from datamodules.decoders import BadSample
from datamodules.media.mesh import MESH_SUFFIXES, read_mesh, sample_mesh_surface
from datamodules.sources import SHOWN_PATHS, class_folders
from datamodules.solids import SOLIDS, caption, inside, sdf, solid_of, surface, volume  # noqa: F401 (re-exported)
from datamodules.transforms import SampleTransform
from datamodules.writers import ShardWriter, write_classes

log = logging.getLogger("duoflow.data")

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


# ---------------------------------------------------------------- meshes


def winding_number(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, budget: int = 2_000_000) -> np.ndarray:
    """Generalised winding number (M,) of a triangle mesh at points (M, 3) (Jacobson et al. 2013).

    The sum of the solid angles of all triangles seen from each point over 4 pi: about +-1 inside a
    closed mesh, 0 outside, and a graceful in-between for meshes with holes or self-intersections,
    where ray parity flips. Chunked over points so that chunk x F stays within ``budget``.
    """
    tri = np.asarray(vertices, np.float64)[faces]  # (F, 3, 3)
    out = np.empty(len(points))
    step = max(1, budget // max(1, len(faces)))
    for s in range(0, len(points), step):
        p = np.asarray(points[s : s + step], np.float64)
        a, b, c = (tri[None, :, k] - p[:, None] for k in range(3))  # (m, F, 3) each
        la, lb, lc = (np.linalg.norm(v, axis=2) for v in (a, b, c))
        det = np.einsum("mfi,mfi->mf", a, np.cross(b, c))
        dot = lambda u, v: np.einsum("mfi,mfi->mf", u, v)  # noqa: E731
        denom = la * lb * lc + dot(a, b) * lc + dot(b, c) * la + dot(c, a) * lb
        out[s : s + step] = np.arctan2(det, denom).sum(axis=1) / (2 * np.pi)  # solid angle = 2 atan2(...)
    return out


def normalise_mesh(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(vertices in the ball of radius BOUND, centre, scale): bounding-box centre to 0, farthest vertex to BOUND."""
    centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    radius = float(np.linalg.norm(vertices - centre, axis=1).max())
    if not np.isfinite(radius) or radius <= 0:
        raise ValueError("degenerate mesh: all vertices coincide or are not finite")
    scale = BOUND / radius
    return (vertices - centre) * scale, centre, scale


def mesh_sample(vertices: np.ndarray, faces: np.ndarray, points: int, queries: int, rng: np.random.Generator) -> tuple:
    """(points (N, 3), queries (M, 3), occ (M,), centre, scale) of one mesh, normalised to [-1, 1]^3."""
    v, centre, scale = normalise_mesh(vertices)
    on_surface = sample_mesh_surface(v, faces, points + queries - queries // 2, rng)
    q = np.concatenate([rng.uniform(-1, 1, (queries // 2, 3)), near_surface_queries(on_surface[points:], rng)])
    occ = np.abs(winding_number(v, faces, q)) > 0.5  # either orientation
    return on_surface[:points], q, occ, centre, scale


def find_meshes(root: Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """(class names, [(label or -1, path)]): class sub-folders when there are any, else the folder itself."""
    is_mesh = lambda p: (p.is_file() or p.is_symlink()) and p.suffix.lower() in MESH_SUFFIXES  # noqa: E731
    classes = class_folders(root)  # a link back to root is no class (a symlink loop)
    files = [(-1, p) for p in sorted(root.iterdir()) if is_mesh(p)]
    files += [(label, p) for label, name in enumerate(classes) for p in sorted((root / name).rglob("*")) if is_mesh(p)]
    return classes, files


def write_mesh_folder(
    src: str, out: str, shard_size: int = 1000, prefix: str = "shape", points: int = 2048, queries: int = 2048,
    progress: bool = True,
) -> list[str]:
    """Shard a folder of PLY/OBJ/OFF meshes into shape samples (same format as ``synthetic_shapes``).

    Layout: ``src/<class>/<name>.{ply,obj,off}`` (class ids = sorted sub-folder names, written to
    classes.json) and/or meshes directly in ``src`` (no ``cls``); a same-name ``.txt`` is the caption.
    Each mesh is centred and scaled into the ball of radius BOUND (``json`` keeps centre and scale);
    occupancy comes from the generalised winding number, so holes and flipped faces are tolerated.
    Unreadable meshes are logged with their path and skipped; returns the shard paths.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"mesh folder {src!r} does not exist; expected a directory of .ply/.obj/.off files")
    classes, files = find_meshes(root)
    if not files:
        raise ValueError(f"mesh folder {src!r} holds no meshes; expected {src}/[<class>/]<name>.{{ply,obj,off}}")
    random.Random(0).shuffle(files)
    if classes:
        write_classes(out, classes)
    skipped: list[str] = []
    with ShardWriter(os.path.join(out, f"{prefix}-%06d.tar"), maxcount=shard_size) as writer:
        for i, (label, path) in enumerate(tqdm(files, desc=f"shards {src}", unit="mesh", disable=not progress)):
            try:
                vertices, faces = read_mesh(path)
                pts, q, occ, centre, scale = mesh_sample(vertices, faces, points, queries, np.random.default_rng(i))
            except Exception as exn:  # noqa: BLE001 - whatever a broken file raises means "unreadable", named and counted
                skipped.append(path.relative_to(root).as_posix())
                log.warning("skipped mesh %s: %s", path, exn)
                continue
            meta = {"path": str(path.relative_to(root)), "centre": centre.tolist(), "scale": scale}
            extra: dict[str, Any] = {"json": meta}
            if label >= 0:
                extra["cls"], meta["class"] = label, classes[label]
            caption_path = path.with_suffix(".txt")
            if caption_path.is_file():
                extra["txt"] = caption_path.read_text(encoding="utf-8").strip()
            writer.write(occupancy_sample(f"{i:08d}", pts, q, occ, **extra))
    names = ", ".join(sorted(skipped)[:SHOWN_PATHS]) + (", ..." if len(skipped) > SHOWN_PATHS else "")
    if len(skipped) == len(files):
        raise ValueError(f"mesh folder {src!r}: none of the {len(skipped)} meshes could be read ({names})")
    if skipped:
        log.warning("write_mesh_folder: skipped %d of %d meshes in %s: %s", len(skipped), len(files), src, names)
    return writer.paths


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
