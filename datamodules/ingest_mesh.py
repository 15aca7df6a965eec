"""``duoflow shards shapes``: a folder of PLY/OBJ/OFF meshes -> shape shards (the format of ``datamodules.shapes``).

Layout: ``SRC/<class>/.../<name>.{ply,obj,off}`` (class ids = sorted sub-folder names, OUT/classes.json; a class
folder is searched to any depth, as in ShapeNet's ``<class>/<model>/models/model.obj``) and/or meshes directly in
SRC (no ``cls``): ``sources.list_media(nested=True)``; names starting with "." are skipped. Captions (``--captions`` manifest, ``.txt``/``.json`` sidecars) and the ``holdout`` split
(OUT/train and OUT/holdout by a hash of the path) are those of every folder command: ``datamodules.sources``.

Frame: shards are z-up (the convention of every shape in this project). ``up`` names the file's up
axis: "z" (the default: ModelNet, most CAD and scan exports) keeps the mesh as it is; "y" (glTF, Blender
OBJ exports, ShapeNet) and "x" turn it by a proper rotation (faces keep their orientation) so that
that axis becomes +z.

Size: ``scale=None`` ("fit", the default) centres each mesh on its bounding-box centre and scales its
farthest vertex to the radius BOUND = 0.9, so every shape fills the ball whatever its size (sizes are
lost). A number keeps sizes comparable across meshes: a mesh unit becomes ``scale * UNITS[units]`` cube
units (``scale`` is per metre, ``units`` the file's unit), still centred; a mesh larger than the ball
at that scale is skipped ("too large"). ``json`` records path, class, up, centre and scale
(stored = (turned - centre) * scale).

Occupancy: ``datamodules.occupancy.inside_mesh`` (signed ray crossings on a grid, tolerant of holes,
flipped and overlapping parts). A mesh whose queries come out inside fewer than ``min_inside`` of the
time (default 1%: a solid's near-surface queries alone give about 25%) is probably an open sheet or
has holes too large to tell inside from out: it is written, warned about with its path and counted.

Files that cannot be used (unreadable, garbage, no triangles, too large) are skipped, counted and named.
``workers`` processes read meshes in parallel (the loop of every folder command: ``writers.ingest``); samples are
written in a fixed order and each mesh's random draws depend only on its position in it, so the shards are the
same for any number of workers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.media.mesh import MESH_SUFFIXES, read_mesh, sample_mesh_surface
from datamodules.occupancy import inside_mesh
from datamodules.shapes import BOUND, near_surface_queries, occupancy_sample
from datamodules.sources import MediaFile, Report, Skipped, plural, shown
from datamodules.writers import Ingester, ingest

log = logging.getLogger("duoflow.data")

UP_AXES = ("z", "y", "x")
_TURNS = {  # rows: new (x, y, z) from old (x, y, z); proper rotations (det +1)
    "z": np.eye(3),
    "y": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float),  # about x by +90 degrees: y -> z, z -> -y
    "x": np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], float),  # about y by -90 degrees: x -> z, z -> -x
}
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001, "in": 0.0254, "ft": 0.3048}
"""Metres per file unit."""
MIN_INSIDE = 0.01


@dataclass(frozen=True)
class MeshOptions:
    points: int = 2048
    """Surface points stored per shape."""
    queries: int = 2048
    """Occupancy queries stored per shape: half uniform in the cube, half near the surface."""
    up: str = "z"
    scale: float | None = None
    """None: fit each mesh to the ball; else cube units per metre."""
    units: str = "m"
    min_inside: float = MIN_INSIDE

    def __post_init__(self) -> None:
        if self.up not in UP_AXES:
            raise ValueError(f"--up-axis: expected one of {', '.join(UP_AXES)}, got {self.up!r}")
        if self.units not in UNITS:
            raise ValueError(f"--units: expected one of {', '.join(UNITS)}, got {self.units!r}")
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"--scale: expected 'fit' or a positive number, got {self.scale}")
        if self.scale is None and self.units != "m":
            raise ValueError(f"--units {self.units} needs a numeric --scale (cube units per metre); --scale fit ignores sizes")
        if not 0 <= self.min_inside <= 1:
            raise ValueError(f"--min-inside: expected a fraction in [0, 1], got {self.min_inside}")
        if self.points < 1 or self.queries < 2:
            raise ValueError(f"--points and --queries: expected >= 1 and >= 2, got {self.points} and {self.queries}")


def turn_up(vertices: np.ndarray, up: str) -> np.ndarray:
    """Vertices (V, 3) of a mesh whose up axis is ``up``, turned so that it points along +z."""
    return vertices @ _TURNS[up].T


def normalise_mesh(vertices: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(vertices in the ball of radius BOUND, centre, scale): bounding-box centre to 0, then ``scale`` or fit to BOUND."""
    if len(vertices) == 0:
        raise Skipped("no surface", "no vertices")
    centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    radius = float(np.linalg.norm(vertices - centre, axis=1).max())
    if not np.isfinite(radius) or radius <= 0:
        raise Skipped("no surface", "all vertices coincide or are not finite")
    if scale is None:
        scale = BOUND / radius
    elif radius * scale > BOUND:
        raise Skipped("too large", f"radius {radius:.4g} x scale {scale:.4g} = {radius * scale:.3f} > {BOUND}; "
                                   "lower --scale or use --scale fit")
    return (vertices - centre) * scale, centre, scale


def mesh_sample(vertices: np.ndarray, faces: np.ndarray, options: MeshOptions, rng: np.random.Generator) -> tuple:
    """(points (N, 3), queries (M, 3), occ (M,), centre, scale) of one mesh, turned z-up and normalised to [-1, 1]^3."""
    if len(faces) == 0:
        raise Skipped("no surface", f"no triangles ({len(vertices)} vertices, 0 faces)")
    fixed = None if options.scale is None else options.scale * UNITS[options.units]
    v, centre, scale = normalise_mesh(turn_up(vertices, options.up), fixed)
    n, m = options.points, options.queries
    try:
        on_surface = sample_mesh_surface(v, faces, n + m - m // 2, rng)
    except ValueError as exn:
        raise Skipped("no surface", str(exn)) from None
    q = np.concatenate([rng.uniform(-1, 1, (m // 2, 3)), near_surface_queries(on_surface[n:], rng)])
    return on_surface[:n], q, inside_mesh(v, faces, q), centre, scale


def read_shape(path: Path, position: int, options: MeshOptions) -> tuple:
    """``Ingester.read``: mesh_sample's tuple for one file, its draws seeded by its ``position`` (any worker count)."""
    vertices, faces = read_mesh(path)
    return mesh_sample(vertices, faces, options, np.random.default_rng(position))


@dataclass
class MeshReport(Report):
    """A folder ``Report`` of meshes, with those written whose occupancy came out (nearly) empty."""

    unit: str = "shape"
    source: str = "shape"
    min_inside: float = MIN_INSIDE
    empty: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = super().summary()
        if self.empty:
            line += (f"; {plural(len(self.empty), 'shape')} written with near-empty occupancy "
                     f"(< {self.min_inside:.0%} of queries inside): {shown(self.empty)}")
        return line


def write_mesh_folder(
    src: str, out: str, options: MeshOptions = MeshOptions(), shard_size: int = 1000, prefix: str = "shape",
    workers: int = 1, progress: bool = True, captions: str | None = None, holdout: float = 0.0,
) -> MeshReport:
    """Shard a folder of meshes into shape samples (see the module docstring); ``report.paths`` are the shards."""
    kind = Ingester(tuple(suffix[1:] for suffix in MESH_SUFFIXES), "meshes", functools.partial(read_shape, options=options),
                    functools.partial(shape_samples, options=options), nested=True,
                    nothing="mesh folder {src!r}: no mesh could be used")
    return ingest(kind, MeshReport(min_inside=options.min_inside), src, out, captions=captions, holdout=holdout,
                  shard_size=shard_size, prefix=prefix, workers=workers, progress=progress)


def shape_samples(file: MediaFile, result: tuple, report: MeshReport, options: MeshOptions) -> list[tuple[str, dict]]:
    """``Ingester.samples``: the shape sample of one mesh; one with near-empty occupancy is warned about and counted."""
    pts, q, occ, centre, scale = result
    if occ.mean() < options.min_inside:
        log.warning("near-empty occupancy: %s: %.2f%% of queries inside (< %g%%): an open sheet or large "
                    "holes?", file.path, 100 * occ.mean(), 100 * options.min_inside)
        report.empty.append(file.name)
    key = f"{file.index:08d}"
    meta = {"up": options.up, "centre": centre.tolist(), "scale": scale}
    return [(key, occupancy_sample(key, pts, q, occ, json=meta))]
