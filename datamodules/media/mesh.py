"""3D media: occupancy grids -> triangle meshes (marching cubes), mesh files, previews, surface samples.

Grid convention (shared with ``ShapeCodec.decode``): ``grid[i, j, k]`` is the occupancy at
(x_i, y_j, z_k) with x_i = -1 + 2 i / (R - 1), so axis 0 is x and z (axis 2) is up.
Mesh files: PLY (ascii and binary, read; binary little-endian, written), OBJ and OFF (read),
parsed here with numpy (a few dozen lines instead of a mesh library dependency).

Legend: B shapes, R grid side, V vertices, F triangles, n sampled points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.measure import marching_cubes

from datamodules.media.image import image_grid

MESH_SUFFIXES = (".ply", ".obj", ".off")
BACKGROUND = np.array([24, 24, 32], np.float32)
SURFACE = np.array([235, 190, 100], np.float32)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
    "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}


def empty_mesh() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)


# ---------------------------------------------------------------- grids <-> meshes


def grid_coords(resolution: int) -> np.ndarray:
    """(R,) coordinates of the grid points along each axis, -1 to 1 inclusive."""
    return np.linspace(-1.0, 1.0, resolution)


def grid_to_mesh(prob: np.ndarray | torch.Tensor, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy grid (R, R, R) -> (vertices (V, 3) float32 in [-1, 1], faces (F, 3) int64), outward facing.

    An empty or completely full grid has no surface inside the cube: it gives V = F = 0. The grid is
    padded with empty space first, so a shape touching the cube's faces is still closed.
    """
    p = prob.detach().float().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob, np.float32)
    if p.ndim != 3 or len(set(p.shape)) != 1 or p.shape[0] < 2:
        raise ValueError(f"grid_to_mesh: expected a cubic (R, R, R) grid with R >= 2, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("grid_to_mesh: the grid holds NaN or inf")
    if not (p.min() < level < p.max()):
        return empty_mesh()
    r = p.shape[0]
    verts, faces, _, _ = marching_cubes(np.pad(p, 1), level)  # occupancy is greater inside ("descent")
    verts = np.clip((verts - 1) * (2.0 / (r - 1)) - 1.0, -1.0, 1.0)
    return verts.astype(np.float32), faces[:, ::-1].astype(np.int64)  # skimage winds inward: flip to outward


def sample_mesh_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) float32 points uniform by area on a triangle mesh."""
    tri = np.asarray(vertices, np.float64)[np.asarray(faces)]  # (F, 3, 3)
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1) if len(tri) else np.zeros(0)
    total = area.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"cannot sample a mesh surface with no area ({len(faces)} faces)")
    idx = rng.choice(len(tri), size=n, p=area / total)
    u, v = rng.random(n), rng.random(n)
    su = np.sqrt(u)[:, None]  # barycentric sqrt trick: uniform in each triangle
    a, b, c = tri[idx, 0], tri[idx, 1], tri[idx, 2]
    return ((1 - su) * a + su * (1 - v[:, None]) * b + su * v[:, None] * c).astype(np.float32)


# ---------------------------------------------------------------- mesh files


def fan_triangulate(polygons: np.ndarray | list[np.ndarray] | list[list[int]]) -> np.ndarray:
    """Polygons (lists of vertex indices, or a (k, n) array) -> triangles (F, 3) int64 by fans; < 3 indices dropped."""
    by_size: dict[int, list] = {}
    if isinstance(polygons, np.ndarray) and polygons.ndim == 2:  # all of one size already
        by_size = {polygons.shape[1]: polygons} if polygons.shape[1] >= 3 else {}
    else:
        for poly in polygons:
            if len(poly) >= 3:
                by_size.setdefault(len(poly), []).append(poly)
    tris = []
    for size, polys in sorted(by_size.items()):
        arr = np.asarray(polys, np.int64)  # (k, size)
        tris += [np.stack([arr[:, 0], arr[:, j], arr[:, j + 1]], axis=1) for j in range(1, size - 1)]
    return np.concatenate(tris) if tris else np.zeros((0, 3), np.int64)


def _checked(path: Path, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.isfinite(vertices).all():
        raise ValueError(f"{path}: expected finite (V, 3) vertices, got {vertices.shape}")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"{path}: face index out of range [0, {len(vertices)})")
    return vertices, faces


def _ply_header(data: bytes, path: Path) -> tuple[str, list[tuple[str, int, list]], int]:
    """(format, [(element, count, [(property, type or (count type, item type))])], body offset)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file (expected 'ply' ... 'end_header')")
    def dtype(name: str) -> str:
        if name not in _PLY_TYPES:
            raise ValueError(f"{path}: unknown PLY property type {name!r}")
        return _PLY_TYPES[name]

    fmt, elements = "", []
    for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[4], (dtype(words[2]), dtype(words[3]))))
            else:
                elements[-1][2].append((words[2], dtype(words[1])))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: unknown PLY format {fmt!r}")
    return fmt, elements, data.index(b"\n", end) + 1


def _ply_binary_element(body: bytes, pos: int, count: int, props: list, order: str) -> tuple[dict, int]:
    """One binary element -> ({property: array or list of arrays}, new offset)."""
    lists = [i for i, (_, t) in enumerate(props) if isinstance(t, tuple)]
    if not lists:
        dtype = np.dtype([(name, order + t) for name, t in props])
        rows = np.frombuffer(body, dtype, count, pos)
        return {name: rows[name] for name, _ in props}, pos + count * dtype.itemsize
    if len(lists) == 1 and count:  # fast path: one list property of constant length (triangle/quad meshes)
        li = lists[0]
        head = np.dtype([(name, order + t) for name, t in props[:li]]).itemsize
        n = int(np.frombuffer(body, order + props[li][1][0], 1, pos + head)[0])
        fields = [(name, order + t) for name, t in props[:li]]
        fields += [("__n", order + props[li][1][0]), (props[li][0], order + props[li][1][1], (n,))]
        fields += [(name, order + t) for name, t in props[li + 1 :]]
        dtype = np.dtype(fields)
        if pos + count * dtype.itemsize <= len(body):
            rows = np.frombuffer(body, dtype, count, pos)
            if (rows["__n"] == n).all():
                return {name: rows[name] for name, _ in props}, pos + count * dtype.itemsize
    out: dict[str, list] = {name: [] for name, _ in props}  # general case: row by row
    for _ in range(count):
        for name, t in props:
            if isinstance(t, tuple):
                n = int(np.frombuffer(body, order + t[0], 1, pos)[0])
                pos += np.dtype(t[0]).itemsize
                out[name].append(np.frombuffer(body, order + t[1], n, pos))
                pos += n * np.dtype(t[1]).itemsize
            else:
                out[name].append(np.frombuffer(body, order + t, 1, pos)[0])
                pos += np.dtype(t).itemsize
    return {name: (v if isinstance(t, tuple) else np.asarray(v)) for (name, t), v in zip(props, out.values())}, pos


def _ply_ascii_element(tokens: list[bytes], pos: int, count: int, props: list) -> tuple[dict, int]:
    if not any(isinstance(t, tuple) for _, t in props):
        rows = np.asarray(tokens[pos : pos + count * len(props)], np.float64).reshape(count, len(props))
        return {name: rows[:, i] for i, (name, _) in enumerate(props)}, pos + count * len(props)
    out: dict[str, list] = {name: [] for name, _ in props}
    for _ in range(count):
        for name, t in props:
            if isinstance(t, tuple):
                n = int(tokens[pos])
                out[name].append(np.asarray(tokens[pos + 1 : pos + 1 + n], np.int64))
                pos += 1 + n
            else:
                out[name].append(float(tokens[pos]))
                pos += 1
    return out, pos


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """PLY (ascii or binary) -> (vertices (V, 3) float64, triangles (F, 3) int64); polygons are fanned.

    Elements other than ``vertex`` and ``face`` are parsed past and ignored; a point cloud gives F = 0.
    """
    path = Path(path)
    data = path.read_bytes()
    fmt, elements, offset = _ply_header(data, path)
    found: dict[str, dict] = {}
    try:
        if fmt == "ascii":
            tokens, pos = data[offset:].split(), 0
            for name, count, props in elements:
                found[name], pos = _ply_ascii_element(tokens, pos, count, props)
        else:
            order, pos = "<" if fmt == "binary_little_endian" else ">", offset
            for name, count, props in elements:
                found[name], pos = _ply_binary_element(data, pos, count, props, order)
    except (ValueError, IndexError, TypeError) as exn:
        raise ValueError(f"{path}: truncated or malformed PLY body ({exn})") from None
    vertex = found.get("vertex", {})
    if not all(k in vertex for k in "xyz"):
        raise ValueError(f"{path}: PLY has no vertex element with x, y, z properties")
    vertices = np.stack([np.asarray(vertex[k], np.float64) for k in "xyz"], axis=1)
    face = found.get("face", {})
    polys = face.get("vertex_indices", face.get("vertex_index", []))
    faces = fan_triangulate(polys if isinstance(polys, np.ndarray) and polys.ndim == 2 else list(polys))
    return _checked(path, vertices, faces)


def read_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Wavefront OBJ ``v`` and ``f`` lines -> (vertices, triangles); negative (relative) indices allowed."""
    path = Path(path)
    vertices, polygons = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        words = line.split()
        try:
            if words[:1] == ["v"]:
                if len(words) < 4:
                    raise ValueError
                vertices.append([float(w) for w in words[1:4]])
            elif words[:1] == ["f"]:
                idx = [int(w.split("/")[0]) for w in words[1:]]
                polygons.append([i - 1 if i > 0 else len(vertices) + i for i in idx])
        except ValueError:
            raise ValueError(f"{path}:{number}: cannot parse {line.strip()!r}") from None
    v = np.asarray(vertices, np.float64).reshape(-1, 3)
    return _checked(path, v, fan_triangulate(polygons))


def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """OFF (also the ModelNet variant with counts glued to the keyword, ``OFF490 518 0``) -> (vertices, triangles)."""
    path = Path(path)
    lines = [ln.split("#")[0].split() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0][0].upper().endswith("OFF") and not lines[0][0].upper().startswith("OFF"):
        raise ValueError(f"{path}: not an OFF file (expected the 'OFF' keyword first)")
    head = lines[0]
    rest = head[0].upper().split("OFF", 1)[1]
    counts = ([rest] if rest else []) + head[1:]
    body = lines[1:]
    if len(counts) < 2:
        counts, body = body[0], body[1:]
    try:
        nv, nf = int(counts[0]), int(counts[1])
        v = np.asarray([ln[:3] for ln in body[:nv]], np.float64).reshape(-1, 3)
        polys = [[int(i) for i in ln[1 : 1 + int(ln[0])]] for ln in body[nv : nv + nf]]
    except (ValueError, IndexError):
        raise ValueError(f"{path}: malformed OFF body") from None
    if len(v) != nv or len(polys) != nf:
        raise ValueError(f"{path}: OFF header promises {nv} vertices and {nf} faces, found {len(v)} and {len(polys)}")
    return _checked(path, v, fan_triangulate(polys))


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A .ply, .obj or .off mesh -> (vertices (V, 3) float64, triangles (F, 3) int64)."""
    readers = {".ply": read_ply, ".obj": read_obj, ".off": read_off}
    suffix = Path(path).suffix.lower()
    if suffix not in readers:
        raise ValueError(f"{path}: unsupported mesh format {suffix!r}; expected one of {MESH_SUFFIXES}")
    return readers[suffix](path)


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    """Binary little-endian PLY (float32 x, y, z; uchar/int32 vertex_indices), as MeshLab and Blender read it."""
    path = Path(path)
    v = np.ascontiguousarray(vertices, "<f4").reshape(-1, 3)
    f = np.asarray(faces, np.int64).reshape(-1, 3)
    rows = np.empty(len(f), np.dtype([("n", "u1"), ("idx", "<i4", (3,))]))
    rows["n"], rows["idx"] = 3, f
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment duoflow\n"
        f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode("ascii") + v.tobytes() + rows.tobytes())
    return path


# ---------------------------------------------------------------- previews


def depth_view(occ: np.ndarray, axis: int, reverse: bool = False) -> np.ndarray:
    """(R, R) shade in [0, 1] of the first occupied voxel seen along ``axis`` (0 = nothing hit)."""
    if reverse:
        occ = np.flip(occ, axis)
    hit = occ.any(axis)
    first = occ.argmax(axis)  # index of the first occupied voxel
    return np.where(hit, 1.0 - 0.65 * first / occ.shape[axis], 0.0)


def views(prob: np.ndarray, level: float = 0.5) -> np.ndarray:
    """(R, 3R + 2, 3) uint8: front (along y), side (along x) and top (down z) depth-shaded silhouettes."""
    occ = np.asarray(prob) > level  # (x, y, z)
    front = depth_view(occ, 1).T[::-1]  # rows z (up at the top), columns x
    side = depth_view(occ, 0, reverse=True).T[::-1]  # seen from +x: rows z, columns y
    top = depth_view(occ, 2, reverse=True).T[::-1]  # seen from above: rows y, columns x
    gap = np.full((occ.shape[0], 1), -1.0)
    shade = np.concatenate([front, gap, side, gap, top], axis=1)[..., None]
    rgb = np.where(shade > 0, shade * SURFACE, BACKGROUND)
    rgb = np.where(shade < 0, 80.0, rgb)  # grey between the views of one shape, white between shapes
    return rgb.round().astype(np.uint8)


def save_meshes(grids: np.ndarray | torch.Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
    """Occupancy grids (B, R, R, R) -> ``<prefix>-0000.ply`` ... plus ``<prefix>-grid.png`` (last path).

    The preview shows three depth-shaded views per shape (front, side, top), one shape per cell.
    """
    g = grids.detach().float().cpu().numpy() if isinstance(grids, torch.Tensor) else np.asarray(grids, np.float32)
    if g.ndim != 4:
        raise ValueError(f"save_meshes: expected grids (B, R, R, R), got shape {g.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_ply(out / f"{prefix}-{i:04d}.ply", *grid_to_mesh(grid)) for i, grid in enumerate(g)]
    upscale = max(1, 96 // g.shape[1])
    cells = np.stack([views(grid) for grid in g]).repeat(upscale, axis=1).repeat(upscale, axis=2)
    preview = out / f"{prefix}-grid.png"
    Image.fromarray(image_grid(cells, nrow=max(1, min(4, len(g))))).save(preview)
    return [*paths, preview]
