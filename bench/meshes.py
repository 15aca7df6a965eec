"""Sharding meshes: seconds per mesh with the exact winding number (the old inside test) vs the ray-crossing grid,
the agreement of their labels, and files/s of ``shards shapes`` with 1 and 2 workers.

Meshes (tests/meshes.py, written as OBJ and read back as sharding reads them): "realistic" is a sphere,
a ring torus around it and an open tube below (9,088 faces, three parts, not watertight); "large" is
the same at finer tessellation (48,896 faces); "tube" is the open tube alone. Per mesh, one pass of
ingest_mesh.read_shape (read, turn, normalise, sample 2048 surface points and 2048 queries, label them)
with each inside test; both label the same queries, so agreement is label for label. Then the
realistic mesh with every third face turned over, each method against the intact mesh's exact labels.

    python bench/meshes.py
    python bench/meshes.py --files 32 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_path import REPO  # noqa: F401
from common import report, table
from datamodules import ingest_mesh
from datamodules.ingest_mesh import MeshOptions, read_shape, write_mesh_folder
from datamodules.occupancy import inside_mesh, winding_number
from tests.meshes import icosphere, merge, open_cylinder, realistic_mesh, torus, write_obj


def meshes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    large = merge(icosphere(5, 1.0), torus(1.5, 0.25, 192, 64), open_cylinder(0.3, -2.2, -0.9, 128, 16))
    return {"realistic": realistic_mesh(), "large": large, "tube": open_cylinder(0.3, -2.2, -0.9, 64, 8)}


def exact_inside(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """What sharding used before: |exact generalised winding number| > 0.5."""
    return np.abs(winding_number(vertices, faces, points)) > 0.5


def timed(path: Path, inside) -> tuple[float, np.ndarray]:
    """(CPU seconds, labels) of one read_shape pass with ``inside`` as the inside test.

    CPU time of this process, not wall time: on a shared machine it moves far less with the load (numpy
    runs these on one thread).
    """
    ingest_mesh.inside_mesh = inside
    try:
        t0 = time.process_time()
        result = read_shape(path, 0, MeshOptions())
        seconds = time.process_time() - t0
    finally:
        ingest_mesh.inside_mesh = inside_mesh
    return seconds, result[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16, help="OBJ files (copies of the realistic mesh) for files/s")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    load = os.getloadavg()[0]  # a shared machine: times scale with it
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, (v, f) in meshes().items():
            path = write_obj(Path(tmp) / f"{name}.obj", v, f)
            new = min(timed(path, inside_mesh)[0] for _ in range(3))
            old, exact = timed(path, exact_inside)
            labels = timed(path, inside_mesh)[1]
            rows.append([name, len(f), old, new, old / new, 100 * float((labels == exact).mean()), 100 * float(exact.mean())])
        v, f = realistic_mesh()
        flipped = np.where((np.arange(len(f)) % 3 == 0)[:, None], f[:, ::-1], f)  # every third face turned over
        truth = timed(write_obj(Path(tmp) / "true.obj", v, f), exact_inside)[1]
        path = write_obj(Path(tmp) / "flipped.obj", v, flipped)
        agree = {name: 100 * float((timed(path, inside)[1] == truth).mean())
                 for name, inside in (("old", exact_inside), ("new", inside_mesh))}
        body = "Per mesh (read + sample + label 2048 queries), one process:\n\n"
        body += table(["mesh", "faces", "old CPU s/mesh (exact winding)", "new CPU s/mesh (ray grid)", "speed-up",
                       "labels agreeing %", "inside % (exact)"], rows)
        body += (f"\n\nThe realistic mesh with every third face turned over (as real meshes often are), labels agreeing "
                 f"with the exact winding number of the intact mesh: old {agree['old']:.1f}%, new {agree['new']:.1f}%.")
        for i in range(args.files):
            write_obj(Path(tmp) / "folder" / f"m{i:03d}.obj", v, f)
        rates = []
        for workers in args.workers:
            rep = write_mesh_folder(str(Path(tmp) / "folder"), str(Path(tmp) / f"out{workers}"), workers=workers,
                                    progress=False)
            rates.append([workers, args.files, rep.seconds, args.files / rep.seconds])
        body += "\n\n`shards shapes` on copies of the realistic mesh (write_mesh_folder, shards included; wall time):\n\n"
        body += table(["workers", "files", "seconds", "files/s"], rates)
    report("meshes", torch.device("cpu"), {"files": args.files, "workers": args.workers,
                                              "load average (1 min) at start": f"{load:.1f}"}, body)


if __name__ == "__main__":
    main()
