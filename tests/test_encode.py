"""`duoflow shards encode`: latents and caption embeddings cached into shards, split across ranks,
resumable, with statistics and a manifest; checked against the autoencoder and encoders themselves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.__main__ import main
from app.encode import encode_shards
from datamodules.decoders import decode_sample
from datamodules.shards import expand_shards
from datamodules.synthetic import write_synthetic
from datamodules.transforms import ImageTransform
from models.codecs.latent_stats import LatentStats
from models.codecs.pretrained import PretrainedAutoencoder
from models.text_encoders import TextEncoders, TextEncoderSpec
from tests.conftest import ROOT


def stored_samples(folder: Path) -> dict[str, dict]:
    """key -> decoded sample of every latent shard in folder (a key seen twice fails)."""
    import webdataset as wds

    out: dict[str, dict] = {}
    for raw in wds.DataPipeline(wds.SimpleShardList(expand_shards(str(folder))), wds.tarfile_to_samples()):
        sample = decode_sample(raw)
        assert sample["__key__"] not in out, f"{sample['__key__']} stored twice"
        out[sample["__key__"]] = sample
    return out


@pytest.fixture(scope="module")
def image_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image-media")
    write_synthetic("image", str(out), num=30, shard_size=6, seed=1, image_size=16, progress=False)  # 5 shards
    return out


def kl_args(pretrained: dict[str, Path]) -> dict:
    return {"autoencoder": str(pretrained["kl"]), "subfolder": "vae", "size": 16}


def test_encode_stores_what_the_models_compute(pretrained, image_media, tmp_path) -> None:
    spec = TextEncoderSpec(str(pretrained["t5"]), max_length=16)
    manifest = encode_shards(str(image_media), str(tmp_path / "lat"), **kl_args(pretrained), text_encoders=[spec],
                             batch_size=4, progress=False)
    stored = stored_samples(tmp_path / "lat")
    assert manifest["samples"] == len(stored) == 30 and manifest["bad_samples"] == 0
    assert sorted(manifest["shards"]) == sorted(Path(u).name for u in expand_shards(str(image_media)))
    codec = PretrainedAutoencoder(str(pretrained["kl"]), subfolder="vae")
    text = TextEncoders([spec])
    assert manifest["autoencoder"]["fingerprint"] == codec.fingerprint
    assert manifest["text_encoders"][0]["fingerprint"] == text.fingerprints[0]
    transform = ImageTransform(size=16, multiple=codec.spatial_factor)
    import webdataset as wds

    raws = list(wds.DataPipeline(wds.SimpleShardList(expand_shards(str(image_media))), wds.tarfile_to_samples()))
    for raw in raws[:7]:
        sample = transform(decode_sample(raw))
        got = stored[sample["__key__"]]
        torch.testing.assert_close(torch.from_numpy(got["latent.npy"]), codec.encode_raw(sample["x"][None])[0],
                                   atol=1e-5, rtol=1e-5)
        encoded = text.encode([sample["txt"]])
        torch.testing.assert_close(torch.from_numpy(got["text.safetensors"]["tokens_0"]), encoded.unpadded(0)[0])
        torch.testing.assert_close(torch.from_numpy(got["text.safetensors"]["pooled"]), encoded.pooled[0])
        assert got["txt"] == sample["txt"] and got["cls"] == sample["cls"]
    # the statistics are those of every stored latent (float64, per channel)
    every = np.concatenate([s["latent.npy"].reshape(4, -1) for s in stored.values()], axis=1).astype(np.float64)
    mean, std = LatentStats.load(str(tmp_path / "lat" / "latent-stats.json"))[0].result()
    np.testing.assert_allclose(mean.numpy(), every.mean(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), every.std(1), rtol=1e-9, atol=1e-12)
    stats_codec = PretrainedAutoencoder(str(pretrained["kl"]), subfolder="vae", stats=str(tmp_path / "lat" / "latent-stats.json"))
    torch.testing.assert_close(stats_codec.latent_mean.double(), mean.float().double())
    assert json.loads((tmp_path / "lat" / "classes.json").read_text()) == json.loads((image_media / "classes.json").read_text())


def run_encode(args: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app", "shards", "encode", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def cli_args(pretrained: dict[str, Path], src: Path, out: Path) -> list[str]:
    return [str(src), str(out), "--autoencoder", str(pretrained["kl"]), "--subfolder", "vae", "--size", "16",
            "--batch-size", "2", "--device", "cpu"]


def test_two_ranks_split_the_work_without_overlap(pretrained, image_media, tmp_path) -> None:
    out = tmp_path / "lat"
    procs = [run_encode(cli_args(pretrained, image_media, out), {"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    inputs = [Path(u).name for u in expand_shards(str(image_media))]
    done = {json.loads(f.read_text())["source"] for f in out.glob("*.done.json")}
    assert sorted(Path(d).name for d in done) == sorted(inputs)
    stored = stored_samples(out)  # fails on a key stored twice
    assert len(stored) == 30 and json.loads((out / "manifest.json").read_text())["samples"] == 30
    ranks = [[Path(u).name for u in expand_shards(str(image_media))][r::2] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(inputs)


def finished_shards(folder: Path) -> list[Path]:
    """Output shards marked done (a shard is done once its <stem>.done.json exists: written last)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("*.tar") if not p.name.startswith(".") and p.with_suffix(".done.json").is_file()]


def test_a_killed_encode_resumes_and_never_rewrites_finished_shards(pretrained, tmp_path) -> None:
    src = tmp_path / "media"
    write_synthetic("image", str(src), num=64, shard_size=4, seed=2, image_size=16, progress=False)  # 16 shards
    out = tmp_path / "lat"
    proc = run_encode([*cli_args(pretrained, src, out)[:-4], "--batch-size", "1", "--device", "cpu"])
    deadline = time.time() + 240
    while not finished_shards(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished_shards(out)}
    assert 0 < len(finished) < 16, f"the kill came at {len(finished)} of 16 shards: nothing to resume"
    again = run_encode(cli_args(pretrained, src, out))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert {p: (Path(out, p).stat().st_ino, Path(out, p).stat().st_mtime_ns) for p in finished} == finished
    assert len(stored_samples(out)) == 64 and not list(out.glob(".*.tmp-*"))


def test_bad_samples_are_skipped_counted_and_named(pretrained, tmp_path, caplog) -> None:
    src = tmp_path / "media"
    write_synthetic("image", str(src), num=6, shard_size=6, seed=3, image_size=16, progress=False)
    shard = next(src.glob("*.tar"))
    with tarfile.open(shard, "a") as tar:  # one more sample whose PNG is garbage
        info = tarfile.TarInfo("broken01.png")
        data = b"not a png at all"
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    manifest = encode_shards(str(shard), str(tmp_path / "lat"), **kl_args(pretrained), progress=False)
    assert manifest["samples"] == 6 and manifest["bad_samples"] == 1
    assert any("broken01" in r.getMessage() for r in caplog.records)


def test_a_folder_of_images_is_sharded_then_encoded(pretrained, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "p0.txt").write_text("a noisy picture")
    manifest = encode_shards(str(folder), str(tmp_path / "lat"), **kl_args(pretrained), progress=False)
    assert manifest["samples"] == 5 and (tmp_path / "lat" / "media").is_dir()
    stored = stored_samples(tmp_path / "lat")
    assert {s["latent.npy"].shape for s in stored.values()} == {(4, 8, 8)}  # 16 px through a factor-2 autoencoder


def test_a_missing_autoencoder_is_one_line(image_media, tmp_path, capsys) -> None:
    code = main(["shards", "encode", str(image_media), str(tmp_path / "lat"), "--autoencoder", str(tmp_path / "gone")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "gone") in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1


def test_a_kill_after_a_shard_is_renamed_but_before_it_is_done_loses_nothing(pretrained, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The window between a shard's rename and its done file: the re-run encodes that shard again, and
    the manifest lists exactly the shards (and samples) on disk."""
    import app.encode

    src = tmp_path / "media"
    write_synthetic("image", str(src), num=8, shard_size=4, seed=4, image_size=16, progress=False)
    real = app.encode.write_atomic
    calls = []

    def dies_at_the_first_done_file(path: Path, text: str) -> None:
        if path.name.endswith(".done.json") and not calls:
            calls.append(path)
            raise KeyboardInterrupt("killed")
        real(path, text)

    monkeypatch.setattr(app.encode, "write_atomic", dies_at_the_first_done_file)
    with pytest.raises(KeyboardInterrupt):
        encode_shards(str(src), str(tmp_path / "lat"), **kl_args(pretrained), progress=False)
    monkeypatch.setattr(app.encode, "write_atomic", real)
    manifest = encode_shards(str(src), str(tmp_path / "lat"), **kl_args(pretrained), progress=False)
    on_disk = {p.name for p in finished_shards(tmp_path / "lat")}
    assert set(manifest["shards"]) == on_disk and manifest["samples"] == 8 == len(stored_samples(tmp_path / "lat"))


def test_resuming_with_other_options_or_models_is_refused(pretrained, image_media, tmp_path: Path) -> None:
    from app.errors import UserError

    out = str(tmp_path / "lat")
    encode_shards(str(image_media), out, **kl_args(pretrained), progress=False)
    with pytest.raises(UserError, match=r"other options"):
        encode_shards(str(image_media), out, **{**kl_args(pretrained), "size": 32}, progress=False)
    with pytest.raises(UserError, match=r"other text_encoders"):
        encode_shards(str(image_media), out, **kl_args(pretrained), progress=False,
                      text_encoders=[TextEncoderSpec(str(pretrained["t5"]))])
    assert encode_shards(str(image_media), out, **kl_args(pretrained), progress=False)["samples"] == 30  # same: fine
