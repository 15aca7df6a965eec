"""3D shapes: analytic solids, mesh folders -> shards, transforms, the shape autoencoder, meshes, checkers, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.__main__ import main
from app.evaluation.checkers.shape import chamfer, coverage_mmd, shape_class_accuracy
from app.shape_latents import encode_shape_shards
from datamodules.decoders import BadSample, decode_sample
from datamodules.ingest_mesh import MeshOptions, write_mesh_folder
from datamodules.media.mesh import (
    grid_coords,
    grid_to_mesh,
    read_mesh,
    read_ply,
    sample_mesh_surface,
    save_meshes,
    write_ply,
)
from datamodules.occupancy import winding_number
from datamodules.shapes import (
    SOLIDS,
    LatentTransform,
    ShapeTransform,
    inside,
    random_solid,
    sdf,
    surface,
    synthetic_shapes,
    volume,
)
from datamodules.synthetic import write_synthetic
from datamodules.transforms import collate
from models.codecs.shape import ShapeAEConfig, ShapeCodec, load_shape_codec
from models.conditioning import ClassLabel
from models.shape_autoencoder import ShapeAutoencoder
from tests.conftest import ROOT, velocity

CONFIG = str(ROOT / "configs/shape/autoencoder.yaml")
TINY_AE = ShapeAEConfig(latents=8, latent_dim=4, width=32, heads=2, dec_layers=1, fourier_bands=4, mlp_ratio=2.0)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed mesh; positive when its faces wind counter-clockwise seen from outside."""
    a, b, c = (np.asarray(vertices, np.float64)[faces[:, k]] for k in range(3))
    return float(np.einsum("fi,fi->f", a, np.cross(b, c)).sum() / 6)


def solid_params(solid: str, seed: int = 0) -> dict:
    """The params of the first random solid of kind ``solid`` drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        label, params = random_solid(rng)
        if SOLIDS[label] == solid:
            return params


def read_tar_samples(paths: list[str]) -> list[dict]:
    """Decoded samples of some shards, in order (tar members grouped by key)."""
    samples: dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key, "__url__": path})[ext] = tar.extractfile(member).read()
    return [decode_sample(s) for s in samples.values()]


# ---------------------------------------------------------------- analytic solids


@pytest.mark.parametrize("solid", SOLIDS)
def test_inside_matches_closed_form_volume(solid: str) -> None:
    params = solid_params(solid)
    n = 200_000
    frac = inside(solid, params, np.random.default_rng(1).uniform(-1, 1, (n, 3))).mean()
    p = volume(solid, params) / 8
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3, (solid, frac * 8, volume(solid, params))


@pytest.mark.parametrize("solid", SOLIDS)
def test_surface_points_lie_on_the_surface(solid: str) -> None:
    params = solid_params(solid)
    pts = surface(solid, params, 5000, np.random.default_rng(2))
    assert np.abs(sdf(solid, params, pts)).max() < 1e-9
    assert np.linalg.norm(pts, axis=1).max() <= 0.9 + 1e-9


def test_surface_sampling_is_uniform_by_area() -> None:
    params = solid_params("cylinder")
    pts = surface("cylinder", params, 40_000, np.random.default_rng(3))
    local = (pts - np.asarray(params["center"])) @ np.asarray(params["rotation"])
    on_side = np.abs(np.abs(local[:, 2]) - params["half_height"]) > 1e-9
    r, h = params["radius"], params["half_height"]
    assert abs(on_side.mean() - 2 * h / (2 * h + r)) < 0.015  # lateral area 4 pi r h of 4 pi r h + 2 pi r^2


def test_synthetic_shapes_are_deterministic_and_consistent() -> None:
    a = list(synthetic_shapes(4, seed=7, points=256, queries=300))
    b = list(synthetic_shapes(6, seed=7, points=256, queries=300))[2:4]
    assert all(np.array_equal(x["points.npy"], y["points.npy"]) for x, y in zip(a[2:], b))
    s = a[0]
    assert s["points.npy"].shape == (256, 3) and s["points.npy"].dtype == np.float32
    assert s["queries.npy"].shape == (300, 3) and s["occ.npy"].shape == (300,) and s["occ.npy"].dtype == np.uint8
    assert np.abs(s["queries.npy"]).max() <= 1.0
    for x in a:
        params = x["json"]
        assert SOLIDS[x["cls"]] == params["solid"]
        assert params["solid"] in x["txt"] or (params["solid"] == "box" and "cube" in x["txt"])
        assert np.array_equal(x["occ.npy"].astype(bool), inside(params["solid"], params, x["queries.npy"]))
        assert 0.05 < x["occ.npy"].mean() < 0.95  # near-surface queries balance the labels
        json.dumps(params)


# ---------------------------------------------------------------- meshes and mesh folders


def cube_mesh() -> tuple[np.ndarray, np.ndarray]:
    """Unit cube [0, 1]^3 as 6 outward quads (vertices, quads)."""
    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
    quads = np.array([[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]])
    return v, quads


def write_cube_files(folder: Path) -> None:
    v, quads = cube_mesh()
    tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    (folder / "boxes").mkdir(parents=True)
    (folder / "dice").mkdir()
    write_ply(folder / "boxes" / "a.ply", v, tris)
    (folder / "boxes" / "a.txt").write_text("a plain cube\n")
    obj = "".join(f"v {x} {y} {z}\n" for x, y, z in v) + "".join("f " + " ".join(str(i + 1) for i in q) + "\n" for q in quads)
    (folder / "boxes" / "b.obj").write_text(obj)
    off = f"OFF\n# a comment\n{len(v)} {len(quads)} 0\n" + "".join(f"{x} {y} {z}\n" for x, y, z in v)
    off += "".join(f"4 {' '.join(map(str, q))}\n" for q in quads)
    (folder / "dice" / "c.off").write_text(off)
    (folder / "dice" / "broken.ply").write_bytes(b"not a mesh")


def test_mesh_readers_agree_on_a_cube(tmp_path: Path) -> None:
    write_cube_files(tmp_path)
    for name in ("boxes/a.ply", "boxes/b.obj", "dice/c.off"):
        v, f = read_mesh(tmp_path / name)
        assert v.shape == (8, 3) and f.shape == (12, 3)
        assert signed_volume(v, f) == pytest.approx(1.0)  # outward winding survives the fan triangulation
    ascii_ply = (b"ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
                 b"element face 1\nproperty list uchar int vertex_indices\nelement edge 1\nproperty int a\n"
                 b"end_header\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n7\n")
    (tmp_path / "quad.ply").write_bytes(ascii_ply)
    v, f = read_ply(tmp_path / "quad.ply")
    assert v.shape == (4, 3) and f.tolist() == [[0, 1, 2], [0, 2, 3]]


def test_winding_number_inside_a_cube() -> None:
    v, quads = cube_mesh()
    tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    w = winding_number(v, tris, np.array([[0.5, 0.5, 0.5], [0.1, 0.9, 0.2], [1.5, 0.5, 0.5], [-0.2, 2, 0]]))
    assert np.allclose(w, [1, 1, 0, 0], atol=1e-9)
    assert np.allclose(winding_number(v, tris[:, ::-1], np.array([[0.5, 0.5, 0.5]])), -1)  # flipped faces


def test_mesh_folder_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_cube_files(tmp_path / "meshes")
    with caplog.at_level(logging.WARNING, logger="duoflow.data"):
        report = write_mesh_folder(str(tmp_path / "meshes"), str(tmp_path / "shards"), MeshOptions(points=500, queries=600),
                                   shard_size=2, progress=False)
    assert "broken.ply" in caplog.text  # reported with its path, then skipped
    assert json.loads((tmp_path / "shards" / "classes.json").read_text()) == ["boxes", "dice"]
    samples = read_tar_samples(report.paths)
    assert len(samples) == 3
    half = 0.9 / np.sqrt(3)  # the cube is scaled so that its corners lie on the sphere of radius 0.9
    for s in samples:
        meta = s["json"]
        assert meta["class"] == ["boxes", "dice"][s["cls"]]
        assert s["points.npy"].shape == (500, 3)
        assert np.allclose(np.abs(s["points.npy"]).max(axis=1), half, atol=1e-5)  # on the cube's faces
        q, occ = s["queries.npy"], s["occ.npy"].astype(bool)
        edge = np.abs(np.abs(q).max(axis=1) - half)
        truth = np.abs(q).max(axis=1) < half
        assert np.array_equal(occ[edge > 1e-6], truth[edge > 1e-6])
        assert 0.2 < occ.mean() < 0.8
    assert [s.get("txt") for s in samples if s["json"]["path"] == "boxes/a.ply"] == ["a plain cube"]


def test_mesh_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_mesh_folder(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no meshes"):
        write_mesh_folder(str(tmp_path / "empty"), str(tmp_path / "out"))


# ---------------------------------------------------------------- transforms


def decoded_shape(**changes) -> dict:
    sample = next(synthetic_shapes(1, seed=3, points=100, queries=80))
    decoded = {"__key__": "00000000", "__url__": "s-000.tar", **sample}
    decoded.update(changes)
    return {k: v for k, v in decoded.items() if v is not None}


def test_shape_transform_subsets_and_stacks() -> None:
    t = ShapeTransform(points=64, queries=200)  # more queries than stored: drawn with replacement
    out = t(decoded_shape())
    assert out["points"].shape == (64, 3) and out["queries"].shape == (200, 3) and out["occ"].shape == (200,)
    assert out["occ"].dtype == torch.float32 and set(out["occ"].unique().tolist()) <= {0.0, 1.0}
    stored = {tuple(p) for p in decoded_shape()["points.npy"].tolist()}
    assert all(tuple(p) in stored for p in out["points"].tolist())
    batch = collate([out, t(decoded_shape())])
    assert batch["points"].shape == (2, 64, 3) and batch["cls"].shape == (2,) and isinstance(batch["txt"], list)


@pytest.mark.parametrize("changes, message", [
    ({"queries.npy": None}, "missing field 'queries.npy'"),
    ({"points.npy": np.full((10, 3), np.nan, np.float32)}, "points.npy holds NaN"),
    ({"points.npy": np.zeros((10, 2), np.float32)}, r"points.npy: expected a numeric \(N, 3\)"),
    ({"occ.npy": np.zeros(7, np.uint8)}, r"occ.npy: expected a numeric \(80\)"),
    ({"occ.npy": np.full(80, 2, np.uint8)}, "0/1 labels"),
    ({"points.npy": np.zeros((0, 3), np.float32)}, "empty"),
])
def test_shape_transform_bad_samples(changes: dict, message: str) -> None:
    with pytest.raises(BadSample, match=message) as info:
        ShapeTransform(points=8, queries=8)(decoded_shape(**changes))
    assert "s-000.tar:00000000" in str(info.value)


def test_latent_transform() -> None:
    z = np.arange(24, dtype=np.float32).reshape(6, 4)
    out = LatentTransform()({"__key__": "k", "__url__": "u", "latent.npy": z, "cls": 2})
    assert out["x"].shape == (6, 4) and out["x"].dtype == torch.float32 and out["cls"] == 2
    with pytest.raises(BadSample, match="u:k: latent.npy: expected a numeric"):
        LatentTransform()({"__key__": "k", "__url__": "u", "latent.npy": z[0]})


# ---------------------------------------------------------------- the codec and its training


def shape_synthetic_samples(n: int, points: int = 128, queries: int = 128, seed: int = 0) -> list[dict]:
    """n procedural shapes as the training transform gives them (a dataset's samples)."""
    t = ShapeTransform(points=points, queries=queries)
    torch.manual_seed(seed)
    return [t({"__key__": s["__key__"], **s}) for s in synthetic_shapes(n, seed=seed, points=points, queries=queries)]


def shape_batch(n: int, points: int = 128, queries: int = 128, seed: int = 0) -> dict:
    return collate(shape_synthetic_samples(n, points, queries, seed))


def test_latent_scale_is_a_running_mean_then_an_ema() -> None:
    """Rates 1, 1/2, 1/3 (the mean of the RMS values so far) until 1/(n+1) falls below the momentum."""
    codec = ShapeCodec(TINY_AE)
    expected = 0.0
    for n, rms in enumerate([2.0, 4.0, 6.0, 8.0, 10.0]):
        codec.update_latent_scale(torch.full((1, 8, 4), rms), momentum=0.25)
        expected += max(0.25, 1 / (n + 1)) * (rms - expected)
        assert float(codec.latent_scale) == pytest.approx(expected, rel=1e-6)
    assert float(codec.latent_scale) == pytest.approx(4.0 + 0.25 * (8 - 4.0) + 0.25 * (10 - 5.0))
    assert int(codec.scale_updates) == 5


def test_codec_shapes_scale_and_chunking() -> None:
    torch.manual_seed(0)
    codec = ShapeCodec(dataclasses.replace(TINY_AE)).eval()  # a copy: the test changes its chunk
    batch = shape_batch(3)
    z = codec.encode(batch["points"])
    assert z.shape == (3, 8, 4)
    assert codec.occupancy(z, batch["queries"]).shape == (3, 128)
    codec.update_latent_scale(torch.full((2, 8, 4), 3.0))  # the first update sets the RMS exactly
    assert float(codec.latent_scale) == pytest.approx(3.0)
    assert torch.allclose(codec.encode(batch["points"]) * 3.0, codec.posterior(batch["points"])[0], atol=1e-6)
    grid = codec.decode(z, resolution=6)
    assert grid.shape == (3, 6, 6, 6) and 0 <= float(grid.min()) and float(grid.max()) <= 1
    codec.cfg.chunk = 50  # chunking over queries changes nothing
    assert torch.allclose(codec.decode(z, resolution=6), grid, atol=1e-6)
    # grid[i, j, k] is the occupancy at (x_i, y_j, z_k)
    c = torch.as_tensor(grid_coords(6), dtype=torch.float32)
    point = torch.stack([c[1], c[4], c[2]])[None, None]
    assert torch.allclose(codec.occupancy(z[:1], point).sigmoid()[0, 0], grid[0, 1, 4, 2], atol=1e-5)


def test_autoencoder_learns_one_batch() -> None:
    torch.manual_seed(0)
    model = ShapeAutoencoder(TINY_AE)
    batch = shape_batch(4, points=64, queries=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        out = model.losses(batch, torch.Generator().manual_seed(len(losses)))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


# ---------------------------------------------------------------- meshes from grids, previews


def sphere_grid(r: int = 32, radius: float = 0.6) -> np.ndarray:
    c = grid_coords(r)
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    return (np.sqrt(x**2 + y**2 + z**2) < radius).astype(np.float32)


def test_marching_cubes_sphere_to_ply_and_back(tmp_path: Path) -> None:
    v, f = grid_to_mesh(sphere_grid())
    radii = np.linalg.norm(v, axis=1)
    assert len(f) > 100 and np.abs(radii - 0.6).max() < 2 / 31  # within a voxel
    assert signed_volume(v, f) == pytest.approx(4 / 3 * np.pi * 0.6**3, rel=0.05)  # closed and outward
    path = write_ply(tmp_path / "s.ply", v, f)
    v2, f2 = read_ply(path)
    assert np.array_equal(v2, v) and np.array_equal(f2, f)
    assert np.linalg.norm(sample_mesh_surface(v, f, 1000, np.random.default_rng(0)), axis=1).mean() == pytest.approx(0.6, abs=0.03)
    for grid in (np.zeros((8, 8, 8)), np.ones((8, 8, 8))):
        empty_v, empty_f = grid_to_mesh(grid)
        assert empty_v.shape == (0, 3) and empty_f.shape == (0, 3)
    with pytest.raises(ValueError, match=r"cubic \(R, R, R\)"):
        grid_to_mesh(np.zeros((4, 4)))


def test_save_meshes_writes_ply_and_a_preview_last(tmp_path: Path) -> None:
    grids = np.stack([sphere_grid(16), np.zeros((16, 16, 16), np.float32)])
    paths = save_meshes(torch.from_numpy(grids), tmp_path, prefix="x")
    assert [p.name for p in paths] == ["x-0000.ply", "x-0001.ply", "x-grid.png"]
    assert read_ply(paths[1])[0].shape == (0, 3)  # an empty shape is an empty but valid PLY
    preview = np.asarray(Image.open(paths[-1]))
    assert preview.ndim == 3 and preview.shape[1] > 2 * preview.shape[0]  # two cells of three views side by side


# ---------------------------------------------------------------- checkers


def test_chamfer_known_answers() -> None:
    g = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1).reshape(-1, 3)  # spacing 1
    assert chamfer(g, g) == 0.0
    v = np.array([0.1, -0.2, 0.15])  # under half the spacing: every point's nearest is its own copy
    assert chamfer(g, g + v) == pytest.approx(2 * v @ v)
    blob = np.random.default_rng(0).normal(size=(200, 3)) * 0.01
    far, diam = 3.0, np.linalg.norm(blob[:, None] - blob[None], axis=-1).max()
    # shifted far beyond its size: every nearest distance lies within far +- diam, so CD ~ 2 far^2
    assert 2 * (far - diam) ** 2 <= chamfer(blob, blob + [far, 0, 0]) <= 2 * (far + diam) ** 2
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        chamfer(np.zeros((4, 2)), g)


def test_coverage_mmd_and_class_accuracy() -> None:
    ref = list(synthetic_shapes(12, seed=1, points=400, queries=2))
    ref_pts, ref_labels = [s["points.npy"] for s in ref], [s["cls"] for s in ref]
    same = coverage_mmd(ref_pts, ref_pts)
    assert same == {"coverage": 1.0, "mmd": 0.0}
    rng = np.random.default_rng(5)  # the same solids, resampled surfaces
    resampled = [surface(s["json"]["solid"], s["json"], 400, rng) for s in ref]
    blobs = [rng.normal(size=(400, 3)) * 0.3 for _ in ref]
    real, noise = coverage_mmd(resampled, ref_pts), coverage_mmd(blobs, ref_pts)
    assert real["mmd"] < 0.2 * noise["mmd"] and real["coverage"] > noise["coverage"]
    assert shape_class_accuracy(resampled, ref_labels, ref_pts, ref_labels) == 1.0
    wrong = [(c + 1) % len(SOLIDS) for c in ref_labels]
    assert shape_class_accuracy(resampled, wrong, ref_pts, ref_labels) == 0.0


# ---------------------------------------------------------------- end to end through the CLI


def test_cli_fit_then_encode_latent_shards(tmp_path: Path) -> None:
    write_synthetic("shape", str(tmp_path / "shapes"), num=64, shard_size=32, progress=False)
    args = ["fit", "--config", CONFIG, "--runs_dir", str(tmp_path / "runs"), "--name", "ae",
            "--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--data.train_shards", str(tmp_path / "shapes" / "*.tar"),
            "--data.batch_size", "8", "--data.num_workers", "0", "--data.transform.init_args.points", "64",
            "--data.transform.init_args.queries", "64", "--model.init_args.codec.width", "32",
            "--model.init_args.codec.heads", "2", "--model.init_args.codec.latents", "16"]
    assert main(args) == 0
    ckpt = tmp_path / "runs" / "ae" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and "duoflow_config" in state and "codec.latent_scale" in state["state_dict"]

    paths = encode_shape_shards(str(ckpt), str(tmp_path / "shapes"), str(tmp_path / "latents"), batch_size=24,
                                progress=False)
    samples = read_tar_samples(paths)
    assert len(samples) == 64 and json.loads((tmp_path / "latents" / "classes.json").read_text()) == list(SOLIDS)
    s = samples[5]
    assert s["latent.npy"].shape == (16, 8) and s["latent.npy"].dtype == np.float32
    assert s["points.npy"].shape == (2048, 3) and "cls" in s and "txt" in s and "json" in s
    codec = load_shape_codec(str(ckpt))
    z = codec.encode(torch.from_numpy(s["points.npy"])[None])[0].numpy()
    assert np.allclose(z, s["latent.npy"], atol=1e-5)  # deterministic: all points, posterior mean, scaled
    assert LatentTransform()(s)["x"].shape == (16, 8)


# ---------------------------------------------------------------- ShapeFlow: set tokens, frozen codec, metrics


def test_latent_set_tokens_have_no_positions() -> None:
    from models.tokenizers.shape import LatentSet
    from models.tokens import tokenize, untokenize

    tok = LatentSet(latents=6, latent_dim=4)
    z = torch.randn(3, 6, 4)
    tokens = tokenize(tok, z)
    assert tokens.pos is None and tokens.x.shape == (3, 6, 4) and tok.token_dim == 4
    assert torch.equal(untokenize(tok, tokens), z)
    packed = tokenize(tok, [torch.randn(5, 4), torch.randn(7, 4)])  # sets of different sizes pack too
    assert packed.pos is None and packed.layout.stream_seqlens(0) == [5, 7]
    with pytest.raises(ValueError, match=r"\(B, K, 4\)"):
        tok.tokenize(torch.randn(3, 6, 5))


def tiny_shape_flow(ckpt: Path, **kwargs):
    from models.backbone import MMDiTConfig
    from models.codecs.shape import ShapeLatents
    from models.generators import ShapeFlow

    backbone = MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1)
    return ShapeFlow(codec=ShapeLatents(str(ckpt), resolution=8), backbone=backbone, **{"conditioning": ClassLabel(5), **kwargs})


def test_shape_flow_is_permutation_equivariant_and_its_codec_frozen(shape_latents) -> None:
    """No positions: permuting the latent set permutes the predicted velocity, nothing else."""
    from models.tokenizers.shape import LatentSet

    torch.manual_seed(0)
    flow = tiny_shape_flow(shape_latents[0]).eval()
    for p in flow.x_out.parameters():  # zero-initialised: give the output layer weights to compare
        torch.nn.init.normal_(p)
    z, t, perm = torch.randn(2, 16, 4), torch.tensor([0.3, 0.7]), torch.randperm(16)
    cond, keep = {"cls": torch.tensor([0, 3])}, torch.zeros(2, dtype=torch.bool)
    v = velocity(flow, z, t, cond, keep)
    torch.testing.assert_close(velocity(flow, z[:, perm], t, cond, keep), v[:, perm], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in flow.codec.parameters())
    assert flow.generate({"cls": [0, 1]}, 2, steps=2).shape == (2, 8, 8, 8)  # occupancy grids
    with pytest.raises(ValueError, match="latents"):
        tiny_shape_flow(shape_latents[0], tokenizer=LatentSet(latents=32, latent_dim=4))


def test_shape_evaluator_scores_real_shapes_as_perfect(shape_latents, synthetic_shards) -> None:
    from app.evaluation.modalities import ShapeEvaluator
    from app.evaluation.run import evaluate_generator
    from datamodules.shards import read_samples

    ckpt, latents = shape_latents
    flow = tiny_shape_flow(ckpt)
    evaluator = ShapeEvaluator(flow, str(latents / "*.tar"), progress=False)
    real = read_samples(str(synthetic_shards("shape") / "*.tar"), evaluator.transform(), 12)
    reference = evaluator.reference(real)
    perfect = evaluator.scores(evaluator.as_generated(real), real["cls"], reference)
    assert perfect["coverage"] == 1.0 and perfect["mmd"] == 0.0 and perfect["fidelity"] == 0.0
    assert perfect["class_acc"] == perfect["real_acc"] == 1.0  # the held-out shapes are in this training set
    scores = evaluate_generator(evaluator, flow, real, reference, num=12, steps=2, progress=False)
    assert set(scores) == {"coverage", "mmd", "fidelity", "class_acc", "real_acc", "empty"}
    assert 0.0 <= scores["empty"] <= 1.0 and scores["mmd"] > 0.0


def test_cli_shards_shapes_then_encode_shapes(tmp_path: Path, shape_latents) -> None:
    write_cube_files(tmp_path / "meshes")  # classes boxes and dice, one broken file
    assert main(["shards", "shapes", str(tmp_path / "meshes"), str(tmp_path / "shapes"), "--points", "128",
                 "--queries", "64"]) == 0
    assert main(["shards", "encode-shapes", "--ckpt", str(shape_latents[0]), str(tmp_path / "shapes"),
                 str(tmp_path / "latents")]) == 0
    samples = read_tar_samples(sorted(str(p) for p in (tmp_path / "latents").glob("latent-*.tar")))
    assert samples and all(s["latent.npy"].shape == (16, 4) and s["points.npy"].shape == (128, 3) for s in samples)
    assert len(samples) == 3 and json.loads((tmp_path / "latents" / "classes.json").read_text()) == ["boxes", "dice"]
