"""Mesh folders -> shape shards: the fast inside test, up axis, scale and units, near-empty occupancy, bad files, workers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from app.__main__ import main
from datamodules.ingest_mesh import MeshOptions, write_mesh_folder
from datamodules.media.mesh import write_ply
from datamodules.occupancy import inside_mesh, ray_winding, winding_number
from datamodules.shapes import near_surface_queries
from tests.meshes import icosphere, merge, open_cylinder, realistic_mesh, write_obj, y_up
from tests.test_shape import cube_mesh, read_tar_samples

SMALL = MeshOptions(points=256, queries=256)


def cube(half: float = 0.5, centre=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A closed, outward cube of half side ``half`` as triangles."""
    v, quads = cube_mesh()
    return (v - 0.5) * 2 * half + np.asarray(centre), np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])


def sharding_queries(v: np.ndarray, f: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Queries as sharding draws them: half uniform in the cube, half near the surface."""
    from datamodules.media.mesh import sample_mesh_surface

    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-1, 1, (n // 2, 3)), near_surface_queries(sample_mesh_surface(v, f, n // 2, rng), rng)])


# ---------------------------------------------------------------- the inside test


def test_inside_matches_closed_forms_for_a_box_and_a_sphere() -> None:
    q = np.random.default_rng(0).uniform(-1, 1, (20_000, 3))
    v, f = cube(0.6)
    assert np.array_equal(inside_mesh(v, f, q), np.abs(q).max(axis=1) < 0.6)
    assert np.array_equal(inside_mesh(v, f[:, ::-1], q), np.abs(q).max(axis=1) < 0.6)  # inward faces: solid too
    v, f = icosphere(3, 0.8)  # inscribed in the sphere of radius 0.8, its faces within 0.8 * 0.995 of the centre
    r = np.linalg.norm(q, axis=1)
    got = inside_mesh(v, f, q)
    assert got[r < 0.79].all() and not got[r > 0.8].any()
    assert ray_winding(v, f, q[r < 0.79]) == pytest.approx(1.0)  # a closed mesh: every ray counts exactly 1


def test_overlapping_parts_stay_inside_where_parity_would_not() -> None:
    v, f = merge(cube(0.4, (-0.2, 0, 0)), cube(0.4, (0.2, 0, 0)))
    overlap = np.array([[0.0, 0.1, -0.1], [0.1, 0.0, 0.3]])
    assert ray_winding(v, f, overlap) == pytest.approx(2.0)
    assert inside_mesh(v, f, overlap).all()
    assert not inside_mesh(v, f, np.array([[0.7, 0, 0], [0, 0.5, 0]])).any()


def test_faces_flipped_here_and_there_still_read_as_solid() -> None:
    """Inconsistent orientation (common in real meshes) breaks signed counts and the exact winding number, not parity."""
    v, f = icosphere(2, 0.7)
    f = np.where((np.arange(len(f)) % 3 == 0)[:, None], f[:, ::-1], f)  # every third face flipped
    q = np.random.default_rng(1).uniform(-1, 1, (5000, 3))
    r = np.linalg.norm(q, axis=1)
    soup = v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3)  # no shared vertices, as STL files store it
    for got in (inside_mesh(v, f, q), inside_mesh(*soup, q)):
        assert got[r < 0.68].all() and not got[r > 0.7].any()
    assert (np.abs(winding_number(v, f, q[r < 0.68])) < 0.5).any()  # why sharding does not trust w alone


def test_inside_agrees_with_the_exact_winding_number_on_a_realistic_mesh() -> None:
    """Three parts, one open (the tube): the fast labels vs the exact generalised winding number's."""
    v, f = realistic_mesh()
    v = (v - (v.min(0) + v.max(0)) / 2) * 0.9 / np.linalg.norm(v - (v.min(0) + v.max(0)) / 2, axis=1).max()
    q = sharding_queries(v, f, 400)
    exact = np.abs(winding_number(v, f, q)) > 0.5
    assert (inside_mesh(v, f, q) == exact).mean() >= 0.99
    assert 0.1 < exact.mean() < 0.6  # the comparison is not between two all-outside answers


# ---------------------------------------------------------------- mesh folders


def test_y_up_mesh_ends_up_z_up(tmp_path: Path) -> None:
    """A sphere on an open stand, stored y-up, is sharded as its z-up original is: stand below, on the z axis."""
    v, f = merge(icosphere(2, 1.0), open_cylinder(0.2, -2.5, -0.9, 24, 4))
    write_obj(tmp_path / "z" / "m.obj", v, f)
    write_obj(tmp_path / "y" / "m.obj", y_up(v), f)
    shards = {}
    for up in ("z", "y"):
        report = write_mesh_folder(str(tmp_path / up), str(tmp_path / f"out-{up}"), MeshOptions(256, 256, up=up),
                                   progress=False)
        shards[up] = read_tar_samples(report.paths)[0]
    pts, scale = shards["y"]["points.npy"], shards["y"]["json"]["scale"]
    low = pts[pts[:, 2] < np.quantile(pts[:, 2], 0.1)]  # the lowest tenth: on the stand (14% of the area)
    assert np.linalg.norm(low[:, :2], axis=1).max() == pytest.approx(0.2 * scale, rel=0.02)  # around the z axis
    assert shards["y"]["json"]["up"] == "y"
    for field in ("points.npy", "queries.npy"):
        assert np.allclose(shards["y"][field], shards["z"][field], atol=1e-5)
    assert np.array_equal(shards["y"]["occ.npy"], shards["z"]["occ.npy"])


def test_scale_keeps_sizes_in_the_files_unit_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    for name, half in (("small", 50.0), ("large", 100.0), ("huge", 400.0)):  # centimetres
        write_ply(tmp_path / "src" / f"{name}.ply", *cube(half, (1000.0, 0, 0)))
    report = write_mesh_folder(str(tmp_path / "src"), str(tmp_path / "out"), MeshOptions(64, 64, scale=0.5, units="cm"),
                               progress=False)
    assert report.skipped == {"too large": ["huge.ply"]}
    extent = {s["json"]["path"]: np.abs(s["points.npy"]).max() for s in read_tar_samples(report.paths)}
    assert extent == pytest.approx({"small.ply": 0.25, "large.ply": 0.5}, abs=1e-6)  # 1 m -> 0.5, centred
    fit = write_mesh_folder(str(tmp_path / "src"), str(tmp_path / "fit"), MeshOptions(64, 64), progress=False)
    assert {round(float(np.abs(s["points.npy"]).max()), 5) for s in read_tar_samples(fit.paths)} == {round(0.9 / 3**0.5, 5)}


def test_near_empty_occupancy_is_written_warned_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sheet = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0.0]]), np.array([[0, 1, 2], [0, 2, 3]])
    write_ply(tmp_path / "src" / "sheet.ply", *sheet)
    write_ply(tmp_path / "src" / "box.ply", *cube())
    with caplog.at_level(logging.WARNING):
        report = write_mesh_folder(str(tmp_path / "src"), str(tmp_path / "out"), SMALL, progress=False)
    assert report.empty == ["sheet.ply"] and report.used == 2
    assert "near-empty occupancy" in caplog.text and str(tmp_path / "src" / "sheet.ply") in caplog.text
    assert "1 shape written with near-empty occupancy (< 1% of queries inside): sheet.ply" in report.summary()
    quiet = write_mesh_folder(str(tmp_path / "src"), str(tmp_path / "quiet"), MeshOptions(256, 256, min_inside=0),
                              progress=False)
    assert quiet.empty == []


def test_garbage_files_are_named_in_one_line_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    write_ply(src / "good.ply", *cube())
    (src / "binary.obj").write_bytes(np.random.default_rng(0).bytes(4096))
    (src / "text.obj").write_text("v 1 2\nf 1 2 3\n")
    (src / "points.obj").write_text("v 0 0 0\nv 1 0 0\n")
    (src / "empty.off").write_bytes(b"")
    assert main(["shards", "shapes", str(src), str(tmp_path / "out"), "--points", "64", "--queries", "64"]) == 0
    out = capsys.readouterr()
    assert "1 shape in" in out.out
    assert "4 skipped: 2 no surface (binary.obj, points.obj), 2 unreadable (empty.off, text.obj)" in out.out
    assert "Traceback" not in out.out + out.err
    (src / "good.ply").unlink()
    assert main(["shards", "shapes", str(src), str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no mesh could be used" in errors[0] and "text.obj" in errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--units", "cm"], "--units cm needs a numeric --scale"),
    (["--scale", "-1"], "--scale: expected 'fit' or a positive number"),
])
def test_option_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    write_ply(tmp_path / "src" / "good.ply", *cube())
    assert main(["shards", "shapes", str(tmp_path / "src"), str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_workers_write_the_same_shards(tmp_path: Path) -> None:
    for i in range(4):
        write_obj(tmp_path / "src" / f"m{i}.obj", *merge(icosphere(2, 1.0 + i), cube(0.5 + i, (2.0, 0, 0))))
    (tmp_path / "src" / "bad.obj").write_text("garbage\nf 1 2 3\n")
    one = write_mesh_folder(str(tmp_path / "src"), str(tmp_path / "one"), SMALL, shard_size=3, progress=False)
    two = write_mesh_folder(str(tmp_path / "src"), str(tmp_path / "two"), SMALL, shard_size=3, workers=2, progress=False)
    assert len(one.paths) == 2 and one.skipped == two.skipped == {"unreadable": ["bad.obj"]}
    assert [Path(p).read_bytes() for p in one.paths] == [Path(p).read_bytes() for p in two.paths]


def test_mesh_folders_take_captions_and_a_holdout_split_like_every_folder_command(tmp_path: Path) -> None:
    """A ShapeNet-like tree (class/model/models/model.obj): a --captions manifest wins over sidecars, a .json
    sidecar is read, every mesh lands in one split by the hash of its path, and both splits carry classes.json."""
    import csv
    import json

    from datamodules.sources import in_holdout

    src = tmp_path / "src"
    names = []
    for cls in ("chair", "table"):
        for i in range(6):
            path = src / cls / f"m{i}" / "models" / "model.ply"
            write_ply(path, *cube(0.3 + 0.05 * i))
            names.append(path.relative_to(src).as_posix())
    (src / "chair/m0/models/model.json").write_text(json.dumps({"caption": "a small chair"}))
    (src / "table/m1/models/model.txt").write_text("ignored: the manifest names this file")
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "caption"), ("table/m1/models/model.ply", "a wide table")])
    code = main(["shards", "shapes", str(src), str(tmp_path / "out"), "--points", "64", "--queries", "64",
                 "--captions", str(tmp_path / "captions.csv"), "--holdout", "0.3"])
    assert code == 0
    seen = {}
    for split in ("train", "holdout"):
        assert json.loads((tmp_path / "out" / split / "classes.json").read_text()) == ["chair", "table"]
        for s in read_tar_samples(sorted((tmp_path / "out" / split).glob("*.tar"))):
            seen[s["json"]["path"]] = (split, s["json"]["class"], s.get("txt"))
    assert sorted(seen) == sorted(names)
    assert all(split == ("holdout" if in_holdout(name, 0.3) else "train") for name, (split, _, _) in seen.items())
    assert {split for split, _, _ in seen.values()} == {"train", "holdout"}
    assert seen["chair/m0/models/model.ply"][1:] == ("chair", "a small chair")
    assert seen["table/m1/models/model.ply"][1:] == ("table", "a wide table")
