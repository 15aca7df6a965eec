"""Data layer: writers, synthetic data, safe decoding, transforms and the shard pipelines."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import shards
from datamodules.decoders import MAX_IMAGE_PIXELS, BadSample, decode_sample
from datamodules.shards import ShardDataModule, count_tar_samples, expand_shards
from datamodules.synthetic import SHAPES, synthetic_images, write_synthetic
from datamodules.transforms import ImageTransform, collate
from datamodules.writers import ShardWriter, encode_field, write_image_folder


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_raw_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A PNG whose header claims width x height pixels; its pixel data would never decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def val_keys(module: ShardDataModule) -> list[str]:
    return [key for batch in module.val_dataloader() for key in batch["__key__"]]


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> str:
    """50 samples in shards of 16, 16, 16 and 2."""
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic("image", str(out), num=50, shard_size=16, progress=False)
    return str(out)


# ---------------------------------------------------------------- writers


def test_writer_round_trip_and_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": f"{i:04d}",
            "png": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
            "cls": i % 3,
            "txt": f"caption {i} é",
            "json": {"i": i, "b": [1, 2]},
            "npy": rng.standard_normal((2, 3)).astype(np.float32),
            "bin": b"\x00raw",
        }
        for i in range(7)
    ]
    paths = {}
    for run in ("a", "b"):
        with ShardWriter(str(tmp_path / run / "shard-%06d.tar"), maxcount=3) as writer:
            for sample in samples:
                writer.write(sample)
        paths[run] = writer.paths
    assert [os.path.basename(p) for p in paths["a"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for a, b in zip(paths["a"], paths["b"]):
        assert open(a, "rb").read() == open(b, "rb").read()
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index == {"shards": {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}}

    members = {}
    for path in paths["a"]:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert names == sorted(names)
            for info in tar:
                assert (info.mtime, info.uid, info.gid) == (tar.getmembers()[0].mtime, 0, 0)
                members[info.name] = tar.extractfile(info).read()
    assert len(members) == 7 * 6
    for sample in samples:
        for ext, value in sample.items():
            if ext != "__key__":
                assert members[f"{sample['__key__']}.{ext}"] == encode_field(ext, value)
    decoded = decode_sample({"__key__": "0001", **{k.split(".")[1]: v for k, v in members.items() if k.startswith("0001.")}})
    assert np.array_equal(decoded["png"], samples[1]["png"]) and decoded["cls"] == 1 and decoded["txt"] == "caption 1 é"
    assert np.array_equal(decoded["npy"], samples[1]["npy"]) and decoded["json"] == {"i": 1, "b": [1, 2]}
    assert "bin" not in decoded
    assert count_tar_samples(paths["a"][0]) == 3


def test_writer_rejects_bad_keys_and_unencodable_values(tmp_path):
    with ShardWriter(str(tmp_path / "s-%06d.tar")) as writer:
        with pytest.raises(ValueError, match="__key__"):
            writer.write({"__key__": "a.b", "txt": "x"})
        with pytest.raises(ValueError, match="cannot encode"):
            writer.write({"__key__": "a", "pyd": object()})


# ---------------------------------------------------------------- decoders and transforms


def test_decode_sample_allow_list(tmp_path):
    import safetensors.numpy
    import soundfile

    audio = np.linspace(-0.5, 0.5, 200, dtype=np.float32).reshape(100, 2)
    wav, flac = io.BytesIO(), io.BytesIO()
    soundfile.write(wav, audio, 8000, format="WAV", subtype="FLOAT")
    soundfile.write(flac, audio, 8000, format="FLAC")
    raw = {
        "__key__": "k",
        "__url__": "s.tar",
        "jpg": encode_field("jpg", np.full((4, 5, 3), 128, np.uint8)),
        "wav": wav.getvalue(),
        "flac": flac.getvalue(),
        "latent.safetensors": safetensors.numpy.save({"z": np.ones((2, 2), np.float32)}),
        "pth": b"x",
        "pickle": pickle.dumps(1),
        "unknown": b"x",
    }
    decoded = decode_sample(raw)
    assert set(decoded) == {"__key__", "__url__", "jpg", "wav", "flac", "latent.safetensors"}
    assert decoded["jpg"].shape == (4, 5, 3) and decoded["jpg"].dtype == np.uint8
    assert decoded["wav"][1] == 8000 and np.allclose(decoded["wav"][0], audio)
    assert decoded["flac"][0].shape == (100, 2) and decoded["flac"][0].dtype == np.float32
    assert np.array_equal(decoded["latent.safetensors"]["z"], np.ones((2, 2)))
    object_array = io.BytesIO()
    np.save(object_array, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample, match="s.tar:k: npy"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "npy": object_array.getvalue()})


def test_decompression_bomb_refused_from_header():
    assert 9000 * 9000 > MAX_IMAGE_PIXELS
    with pytest.raises(BadSample, match="shard.tar:key: png: .*MAX_IMAGE_PIXELS"):
        decode_sample({"__key__": "key", "__url__": "shard.tar", "png": bomb_png()})


def test_image_transform_resize_crop_and_errors():
    transform = ImageTransform(size=16, random_flip=True, image_key="png,npy")
    out = transform({"__key__": "k", "png": np.full((20, 40, 3), 255, np.uint8), "cls": 2, "txt": "hi"})
    assert out["x"].shape == (3, 16, 16) and out["x"].dtype == torch.float32
    assert torch.allclose(out["x"], torch.ones(3, 16, 16))
    assert (out["cls"], out["txt"], out["__key__"]) == (2, "hi", "k")
    out = transform({"__key__": "k", "npy": np.zeros((16, 16), np.float32)})
    assert torch.equal(out["x"], -torch.ones(3, 16, 16)) and (out["cls"], out["txt"]) == (-1, "")
    for bad in ({"txt": "no image"}, {"npy": np.full((16, 16, 3), np.nan, np.float32)}, {"npy": np.zeros((16, 16, 4), np.uint8)}):
        with pytest.raises(BadSample):
            transform({"__key__": "k", "__url__": "s.tar", **bad})
    batch = collate([out, out])
    assert batch["x"].shape == (2, 3, 16, 16) and batch["cls"].dtype == torch.long
    assert batch["txt"] == ["", ""] and batch["__key__"] == ["k", "k"]


# ---------------------------------------------------------------- synthetic data


def test_synthetic_deterministic_and_consistent():
    first, again, other = (list(synthetic_images(24, seed=s)) for s in (0, 0, 1))
    for a, b in zip(first, again):
        assert np.array_equal(a["png"], b["png"]) and a["txt"] == b["txt"]
    assert any(not np.array_equal(a["png"], b["png"]) for a, b in zip(first, other))
    assert {s["cls"] for s in first} == set(range(len(SHAPES)))
    for sample in first:
        meta, image = sample["json"], sample["png"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert SHAPES[sample["cls"]] == meta["shape"]
        assert sample["txt"].startswith(f"a {meta['size']} {meta['colour']} {meta['shape']} ")
        foreground = (np.abs(image.astype(int) - image[0, 0].astype(int)).sum(-1) > 60).mean()
        assert 0.04 < foreground < 0.7, (sample["txt"], foreground)
    assert next(synthetic_images(1, seed=0))["txt"] == first[0]["txt"]  # sample i does not depend on num


def test_write_synthetic_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="accepted: image"):
        write_synthetic("smell", str(tmp_path), num=1)


# ---------------------------------------------------------------- shard lists


def test_expand_shards(synthetic_shards):
    pattern = f"{synthetic_shards}/shard-{{000000..000003}}.tar"
    expected = [f"{synthetic_shards}/shard-{i:06d}.tar" for i in range(4)]
    assert expand_shards(pattern) == expected
    assert expand_shards(f"{synthetic_shards}/shard-*.tar") == expected
    assert expand_shards(synthetic_shards) == expected
    assert expand_shards([expected[0], expected[1]]) == expected[:2]
    with pytest.raises(FileNotFoundError, match=r"6 shard\(s\) from .* do not exist: .*shard-000004.tar"):
        expand_shards(f"{synthetic_shards}/shard-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(f"{synthetic_shards}/nothing-*.tar")


# ---------------------------------------------------------------- pipelines


def test_train_loader_exact_batches(synthetic_shards):
    module = ShardDataModule(synthetic_shards, batch_size=8, num_workers=0, shuffle_buffer=20)
    loader = module.train_dataloader()
    assert len(loader) == 50 // 8
    keys = []
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == 6
        for batch in batches:
            assert batch["x"].shape == (8, 3, 32, 32) and batch["x"].dtype == torch.float32
            assert batch["x"].min() >= -1 and batch["x"].max() <= 1 and batch["x"].std() > 0.1
            assert batch["cls"].dtype == torch.long and batch["cls"].shape == (8,)
            assert len(batch["txt"]) == 8 and all(t.startswith("a ") for t in batch["txt"])
            keys += batch["__key__"]
    assert len(set(keys[:48])) >= 40  # the stream moves on through the data (shuffled, endless)


def test_equal_batches_per_rank_with_workers(tmp_path, monkeypatch):
    """2 ranks x 2 workers over 2 unequal shards (25 and 5 samples): every rank yields the same batch count."""
    write_synthetic("image", str(tmp_path), num=30, shard_size=25, progress=False)
    counts = []
    for rank in range(2):
        monkeypatch.setattr(shards, "dist_info", lambda rank=rank: (rank, 2))
        module = ShardDataModule(str(tmp_path), batch_size=4, num_workers=2, shuffle_buffer=8)
        loader = module.train_dataloader()
        counts.append([sum(1 for _ in loader) for _epoch in range(2)])
        assert len(loader) == 30 // (4 * 2)
    assert counts == [[3, 3], [3, 3]]


def test_val_sees_every_sample_once(synthetic_shards, monkeypatch):
    all_keys = [f"{i:08d}" for i in range(50)]
    module = ShardDataModule(synthetic_shards, val_shards=synthetic_shards, batch_size=8, num_workers=0)
    keys = val_keys(module)
    assert sorted(keys) == all_keys and len(keys) == 50
    assert val_keys(module) == keys  # deterministic
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(shards, "dist_info", lambda rank=rank: (rank, 2))
        per_rank.append(val_keys(module))
    assert sorted(per_rank[0] + per_rank[1]) == all_keys
    assert ShardDataModule(synthetic_shards).val_dataloader() == []


def test_pickle_members_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())
    image = png_bytes(np.full((32, 32, 3), 200, np.uint8))
    shard = write_raw_tar(
        tmp_path / "evil.tar",
        [
            ("a.cls", b"1"), ("a.png", image), ("a.pyd", payload), ("a.pickle", payload), ("a.pth", payload), ("a.pt", payload),
            ("b.cls", b"2"), ("b.pyd", payload),  # no image: skipped
        ],
    )
    module = ShardDataModule(shard, val_shards=shard, batch_size=1, num_workers=0, max_bad_fraction=1.0)
    batches = list(module.val_dataloader())
    assert [b["__key__"] for b in batches] == [["a"]] and batches[0]["cls"].tolist() == [1]
    train = list(module.train_dataloader())
    assert len(train) == 2 and all(b["__key__"] == ["a"] for b in train)
    assert not marker.exists()


def test_bad_samples_skipped_and_logged(tmp_path, caplog):
    good = png_bytes(np.full((32, 32, 3), 100, np.uint8))
    shard = write_raw_tar(
        tmp_path / "mixed.tar",
        [
            ("g0.png", good), ("corrupt.png", good[:40] + b"garbage" * 10), ("g1.png", good),
            ("missing.txt", b"caption only"), ("bomb.png", bomb_png()), ("g2.png", good),
        ],
    )
    module = ShardDataModule(shard, val_shards=shard, batch_size=2, num_workers=0, max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="duoflow.data"):
        keys = val_keys(module)
    assert keys == ["g0", "g1", "g2"]
    messages = "\n".join(r.getMessage() for r in caplog.records if r.name == "duoflow.data")
    for key in ("corrupt", "missing", "bomb"):
        assert f"{shard}:{key}" in messages
    assert "3 of 5 bad" in messages


def test_too_many_bad_samples_stops_the_run(tmp_path):
    shard = write_raw_tar(tmp_path / "bad.tar", [(f"k{i}.png", b"not a png") for i in range(10)])
    module = ShardDataModule(shard, batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match="max_bad_fraction=0.05"):
        list(module.train_dataloader())


# ---------------------------------------------------------------- image folders


def test_write_image_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, colour in colours.items():
        (src / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(src / name / f"{name}{i}.png")
        (src / name / f"{name}0.txt").write_text(f"a photo of a {name}\n")
    Image.new("RGB", (24, 24), colours["dog"]).save(src / "dog" / "extra.jpg", quality=95)
    (src / "dog" / "notes.md").write_text("ignored")

    paths = write_image_folder(str(src), str(out), shard_size=4, progress=False)
    assert len(paths) == 2
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    module = ShardDataModule(str(out), val_shards=str(out), transform=ImageTransform(size=16), batch_size=3, num_workers=0)
    seen = 0
    for batch in module.val_dataloader():
        for x, label, caption in zip(batch["x"], batch["cls"].tolist(), batch["txt"]):
            name = ["cat", "dog"][label]
            expected = torch.tensor(colours[name], dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=0.05)
            assert caption in ("", f"a photo of a {name}")
            seen += 1
    assert seen == 7
    assert sum(json.loads((out / "index.json").read_text())["shards"].values()) == 7

    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_image_folder(str(tmp_path / "nowhere"), str(out), progress=False)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        write_image_folder(str(tmp_path / "empty"), str(out), progress=False)


def test_pipelines_pickle_for_spawned_workers(synthetic_shards):
    """Worker processes started with 'spawn' (macOS, some clusters) receive the dataset by pickle."""
    module = ShardDataModule(synthetic_shards, val_shards=synthetic_shards, batch_size=8, num_workers=0)
    for loader in (module.train_dataloader(), module.val_dataloader()):
        pickle.loads(pickle.dumps(loader.dataset))


def test_a_bad_sample_is_named_once_not_in_every_epoch(tmp_path, caplog):
    """Training meets the same broken sample every epoch: it is counted each time but named once."""
    good = png_bytes(np.full((32, 32, 3), 100, np.uint8))
    shard = write_raw_tar(tmp_path / "one-bad.tar", [("g0.png", good), ("corrupt.png", good[:40]), ("g1.png", good),
                                                     ("g2.png", good)])
    module = ShardDataModule(shard, batch_size=1, num_workers=0, max_bad_fraction=1.0, samples_per_epoch=3)
    with caplog.at_level(logging.WARNING, logger="duoflow.data"):
        loader = module.train_dataloader()
        for _ in range(3):  # three epochs over the same shard
            list(loader)
    named = [r for r in caplog.records if r.name == "duoflow.data" and "corrupt" in r.getMessage()]
    assert len(named) == 1
