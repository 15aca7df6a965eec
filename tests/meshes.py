"""Meshes built with numpy for the mesh tests and bench/meshes.py: closed parts, an open part, and a realistic mix.

All parts are outward facing (counter-clockwise seen from outside) and z-up unless rotated.
Legend: V vertices, F triangles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def icosphere(subdivisions: int, radius: float = 1.0, centre=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A closed sphere: an icosahedron split ``subdivisions`` times (20 * 4^s faces)."""
    t = (1 + 5**0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
                  [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11],
                  [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    verts = list(v)
    for _ in range(subdivisions):
        mid: dict[tuple[int, int], int] = {}

        def middle(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in mid:
                mid[key] = len(verts)
                verts.append((verts[a] + verts[b]) / 2)
            return mid[key]

        split = []
        for a, b, c in f:
            ab, bc, ca = middle(a, b), middle(b, c), middle(c, a)
            split += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        f = np.asarray(split)
    out = np.asarray(verts)
    return radius * out / np.linalg.norm(out, axis=1, keepdims=True) + np.asarray(centre), f


def grid_faces(rows: int, cols: int, wrap_cols: bool, wrap_rows: bool) -> np.ndarray:
    """Two triangles per quad of a (rows, cols) vertex grid, vertex (i, j) = i * cols + j."""
    faces = []
    for i in range(rows if wrap_rows else rows - 1):
        for j in range(cols if wrap_cols else cols - 1):
            a, b = i * cols + j, i * cols + (j + 1) % cols
            c, d = ((i + 1) % rows) * cols + (j + 1) % cols, ((i + 1) % rows) * cols + j
            faces += [[a, b, c], [a, c, d]]
    return np.asarray(faces)


def torus(major: float, minor: float, n: int = 48, m: int = 24, centre=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A closed torus about the z axis: n x m quads."""
    u, w = np.meshgrid(np.linspace(0, 2 * np.pi, n, endpoint=False), np.linspace(0, 2 * np.pi, m, endpoint=False),
                       indexing="ij")
    ring = major + minor * np.cos(w)
    v = np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(w)], -1).reshape(-1, 3)
    return v + np.asarray(centre), grid_faces(n, m, wrap_cols=True, wrap_rows=True)[:, ::-1]


def open_cylinder(radius: float, z0: float, z1: float, n: int = 48, rings: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A tube about the z axis from z0 to z1 without caps: not watertight."""
    z, u = np.meshgrid(np.linspace(z0, z1, rings), np.linspace(0, 2 * np.pi, n, endpoint=False), indexing="ij")
    v = np.stack([radius * np.cos(u), radius * np.sin(u), z], -1).reshape(-1, 3)
    return v, grid_faces(rings, n, wrap_cols=True, wrap_rows=False)


def merge(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One mesh of several parts (vertex indices shifted)."""
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    return np.concatenate([v for v, _ in parts]), np.concatenate([f + o for (_, f), o in zip(parts, offsets)])


def realistic_mesh() -> tuple[np.ndarray, np.ndarray]:
    """9,088 faces in three parts, one of them open: a sphere, a ring torus around it, and a tube below (a stand)."""
    return merge(icosphere(4, 1.0), torus(1.5, 0.25, 64, 24), open_cylinder(0.3, -2.2, -0.9, 64, 8))


def y_up(vertices: np.ndarray) -> np.ndarray:
    """The same mesh with y up, as Blender/glTF/ShapeNet export it: z-up (x, y, z) -> y-up (x, z, -y)."""
    x, y, z = vertices.T
    return np.stack([x, z, -y], axis=1)


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")
    return path
