"""``duoflow shards shapes``: a folder of PLY/OBJ/OFF meshes -> shape shards (the format of ``datamodules.shapes``).

Layout: ``SRC/<class>/.../<name>.{ply,obj,off}`` (class ids = sorted sub-folder names, OUT/classes.json; a class
folder is searched to any depth, as in ShapeNet's ``<class>/<model>/models/model.obj``) and/or meshes directly in
SRC (no ``cls``). Captions (``--captions`` manifest, ``.txt``/``.json`` sidecars) and the ``holdout`` split
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
``workers`` processes read meshes in parallel; samples are written in a fixed order and each mesh's
random draws depend only on its position, so the shards are the same for any number of workers.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.media.mesh import MESH_SUFFIXES, read_mesh, sample_mesh_surface
from datamodules.occupancy import inside_mesh
from datamodules.parallel import check_workers, ordered_map
from datamodules.shapes import BOUND, near_surface_queries, occupancy_sample
from datamodules.sources import (
    MediaFile,
    Report,
    Skipped,
    class_folders,
    label_and_caption,
    plural,
    read_manifest,
    shown,
    split_folders,
)
from datamodules.writers import SplitWriter, labelled

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


def read_one(task: tuple[int, str, MeshOptions]) -> tuple[int, tuple | None, str, str]:
    """Worker: (position, mesh_sample's tuple or None, skip reason, detail); never raises for a bad file."""
    position, path, options = task
    try:
        vertices, faces = read_mesh(path)
        return position, mesh_sample(vertices, faces, options, np.random.default_rng(position)), "", ""
    except Skipped as exn:
        return position, None, exn.reason, str(exn)
    except Exception as exn:  # noqa: BLE001 - anything a broken file raises means "unreadable", named and counted
        return position, None, "unreadable", str(exn).strip() or type(exn).__name__


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


def find_meshes(root: Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """(class names, [(label or -1, path)]): class sub-folders when there are any, else the folder itself."""
    is_mesh = lambda p: (p.is_file() or p.is_symlink()) and p.suffix.lower() in MESH_SUFFIXES  # noqa: E731
    classes = class_folders(root)  # a link back to root is no class folder (a symlink loop)
    files = [(-1, p) for p in sorted(root.iterdir()) if is_mesh(p)]
    files += [(label, p) for label, name in enumerate(classes) for p in sorted((root / name).rglob("*")) if is_mesh(p)]
    return classes, files


def write_mesh_folder(
    src: str, out: str, options: MeshOptions = MeshOptions(), shard_size: int = 1000, prefix: str = "shape",
    workers: int = 1, progress: bool = True, captions: str | None = None, holdout: float = 0.0,
) -> MeshReport:
    """Shard a folder of meshes into shape samples (see the module docstring); ``report.paths`` are the shards."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"mesh folder {src!r} does not exist; expected a directory of .ply/.obj/.off files")
    check_workers(workers)
    folders = split_folders(out, holdout)
    classes, found = find_meshes(root)
    if not found:
        raise ValueError(f"mesh folder {src!r} holds no meshes; expected {src}/[<class>/]<name>.{{ply,obj,off}}")
    files = [MediaFile(i, path, path.relative_to(root).as_posix(), None if label < 0 else label)
             for i, (label, path) in enumerate(found)]
    classes = label_and_caption(root, classes, files, read_manifest(captions) if captions else {})
    order = list(files)
    random.Random(0).shuffle(order)  # a shard mixes classes
    writer = SplitWriter(folders, holdout, classes, prefix, shard_size)
    report = MeshReport(files=len(files), written={split: 0 for split in writer.writers}, min_inside=options.min_inside)
    tasks = [(j, str(file.path), options) for j, file in enumerate(order)]
    started = time.perf_counter()
    try:
        with ordered_map(read_one, tasks, workers) as results:
            for j, result, reason, detail in tqdm(results, total=len(tasks), desc=f"shards {src}", unit="mesh",
                                                  disable=not progress):
                file = order[j]
                if result is None:
                    report.skip(file, reason, detail)
                    continue
                pts, q, occ, centre, scale = result
                if occ.mean() < options.min_inside:
                    log.warning("near-empty occupancy: %s: %.2f%% of queries inside (< %g%%): an open sheet or large "
                                "holes?", file.path, 100 * occ.mean(), 100 * options.min_inside)
                    report.empty.append(file.name)
                key = f"{file.index:08d}"
                meta = {"up": options.up, "centre": centre.tolist(), "scale": scale}
                split = writer.split(file)
                writer.write(split, labelled(file, classes, key, occupancy_sample(key, pts, q, occ, json=meta)))
                report.written[split] += 1
                report.used += 1
    finally:
        report.paths = writer.close()
    return report.finish(started, f"mesh folder {src!r}: no mesh could be used")
