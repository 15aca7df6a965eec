"""Folder sources shared by `shards images|audio|videos|shapes`: layout, manifests, sidecars, classes, holdout, workers, broken files skipped and named."""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from datamodules import decoders
from datamodules.sources import in_holdout, list_media, read_manifest, sidecar_caption

SR = 8000


def png(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seconds: float = 0.1, hz: float = 440.0) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * hz * np.arange(round(seconds * SR)) / SR), SR, format="WAV")
    return buffer.getvalue()


def flac() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(400), 16000, format="FLAC")
    return buffer.getvalue()


def make(folder: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return folder


def by_path(folder: Path) -> dict[str, dict[str, bytes]]:
    """{json path: {extension: bytes}} of every shard in ``folder``."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        samples.update({json.loads(m["json"])["path"]: m for m in members.values()})
    return samples


def shards(*argv: str) -> int:
    from app.__main__ import main

    return main(["shards", *argv])


def labels_and_captions(folder: Path) -> dict[str, tuple[str | None, str | None]]:
    return {path: (json.loads(s["json"]).get("class"), s["txt"].decode() if "txt" in s else None)
            for path, s in by_path(folder).items()}


# layout -----------------------------------------------------------------------------------------


def test_nested_layout_searches_class_folders_to_any_depth_and_keeps_loose_files_first(tmp_path):
    """``shards shapes`` (ShapeNet's class/model/models/model.obj): every depth, files in SRC beside the classes
    (no class, first), hidden names skipped as in every folder command; the flat rule ignores both."""
    files = ["b.obj", "._b.obj", "chair/m1/models/model.obj", "chair/m0/models/model.obj", "chair/top.obj",
             "table/m0/models/._model.obj", "table/m0/models/model.obj", "table/notes.txt"]
    src = make(tmp_path / "src", {name: "v 0 0 0\n" for name in files})
    classes, found = list_media(str(src), ("obj",), "meshes", nested=True)
    assert classes == ["chair", "table"]
    assert [(f.index, f.name, f.label) for f in found] == [
        (0, "b.obj", None), (1, "chair/m0/models/model.obj", 0), (2, "chair/m1/models/model.obj", 0),
        (3, "chair/top.obj", 0), (4, "table/m0/models/model.obj", 1)]
    assert [f.name for f in list_media(str(src), ("obj",), "meshes")[1]] == ["chair/top.obj"]


# manifests and sidecars -------------------------------------------------------------------------


def test_read_manifest_csv_and_jsonl(tmp_path):
    (tmp_path / "m.csv").write_text('path,caption,class\na.png,"an a, quoted",x\nsub\\b.png,  bee  ,\n')
    assert read_manifest(str(tmp_path / "m.csv")) == {"a.png": {"caption": "an a, quoted", "class": "x"},
                                                      "sub/b.png": {"caption": "bee", "class": None}}
    (tmp_path / "m.jsonl").write_text('{"path": "a.wav", "text": "ay"}\n\n{"path": "b.wav", "caption": "bee", "class": 3}\n')
    assert read_manifest(str(tmp_path / "m.jsonl")) == {"a.wav": {"caption": "ay", "class": None},
                                                        "b.wav": {"caption": "bee", "class": "3"}}
    (tmp_path / "bad.jsonl").write_text('{"path": "a.wav"}\n')
    with pytest.raises(ValueError, match="line 1 needs 'path' and 'caption'"):
        read_manifest(str(tmp_path / "bad.jsonl"))
    (tmp_path / "m.tsv").write_text("")
    with pytest.raises(ValueError, match="expected a .csv or .jsonl"):
        read_manifest(str(tmp_path / "m.tsv"))


def test_sidecars_txt_then_json_caption_or_text(tmp_path, caplog):
    make(tmp_path, {"a.txt": "from txt\n", "a.json": '{"caption": "loses"}', "b.json": '{"caption": " cap "}',
                    "c.json": '{"text": "from text"}', "d.json": "not json", "e.json": '["a list"]'})
    with caplog.at_level(logging.WARNING):
        got = {name: sidecar_caption(tmp_path / f"{name}.png") for name in "abcdef"}
    assert got == {"a": "from txt", "b": "cap", "c": "from text", "d": None, "e": None, "f": None}
    assert "d.json" in caplog.text


def test_images_csv_manifest_labels_a_flat_folder_and_sidecars_fill_the_rest(tmp_path):
    src = make(tmp_path / "src", {"a.png": png((255, 0, 0)), "b.png": png((0, 255, 0)), "c.png": png((0, 0, 255)),
                                  "d.jpg": png((9, 9, 9)), "c.json": '{"text": "c from json"}', "d.txt": "d from txt"})
    with (tmp_path / "m.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "caption", "class"], ["a.png", "red", "warm"], ["b.png", "green", "cold"],
                                 ["c.png", "blue", ""]])
    assert shards("images", str(src), str(tmp_path / "out"), "--captions", str(tmp_path / "m.csv")) == 0
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["cold", "warm"]
    assert labels_and_captions(tmp_path / "out") == {
        "a.png": ("warm", "red"), "b.png": ("cold", "green"), "c.png": (None, "blue"), "d.jpg": (None, "d from txt")}
    samples = by_path(tmp_path / "out")
    assert int(samples["a.png"]["cls"]) == 1 and "cls" not in samples["c.png"]
    assert samples["d.jpg"]["jpg"] == (src / "d.jpg").read_bytes()  # original bytes, under the file's extension


def test_audio_jsonl_manifest_with_and_without_class_in_class_folders(tmp_path):
    src = make(tmp_path / "src", {"dog/a.wav": wav(), "dog/b.flac": flac(), "cat/c.wav": wav(0.2), "cat/d.wav": wav(0.05),
                                  "cat/d.json": '{"caption": "d from json"}'})
    rows = [{"path": "dog/a.wav", "caption": "a dog", "class": "dog"}, {"path": "cat/c.wav", "text": "a cat"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert shards("audio", str(src), str(tmp_path / "out"), "--captions", str(tmp_path / "m.jsonl")) == 0
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["cat", "dog"]
    assert labels_and_captions(tmp_path / "out") == {
        "dog/a.wav": ("dog", "a dog"), "dog/b.flac": ("dog", None), "cat/c.wav": ("cat", "a cat"),
        "cat/d.wav": ("cat", "d from json")}
    meta = json.loads(by_path(tmp_path / "out")["cat/c.wav"]["json"])
    assert meta["sample_rate"] == SR and meta["seconds"] == 0.2

    rows[0]["class"] = "cat"  # a manifest class must be the file's own class folder
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert shards("audio", str(src), str(tmp_path / "bad"), "--captions", str(tmp_path / "m.jsonl")) == 2


# holdout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, ext, data", [("images", "png", lambda i: png((i, 2 * i, 3 * i))),
                                             ("audio", "wav", lambda i: wav(0.05, 200 + 20 * i))])
def test_holdout_is_deterministic_disjoint_and_by_path(tmp_path, kind, ext, data):
    src = make(tmp_path / "src", {f"{'ab'[i % 2]}/f{i}.{ext}": data(i) for i in range(12)})
    for out in ("one", "two"):
        assert shards(kind, str(src), str(tmp_path / out), "--holdout", "0.3", "--shard-size", "4") == 0
    for split in ("train", "holdout"):
        one, two = sorted((tmp_path / "one" / split).iterdir()), sorted((tmp_path / "two" / split).iterdir())
        assert [p.name for p in one] == [p.name for p in two] and all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
        assert json.loads((tmp_path / "one" / split / "classes.json").read_text()) == ["a", "b"]
    got = {split: set(by_path(tmp_path / "one" / split)) for split in ("train", "holdout")}
    assert got["train"] and got["holdout"] and not got["train"] & got["holdout"]
    assert got["train"] | got["holdout"] == {f"{'ab'[i % 2]}/f{i}.{ext}" for i in range(12)}
    assert got["holdout"] == {name for name in got["train"] | got["holdout"] if in_holdout(name, 0.3)}
    assert not list((tmp_path / "one").glob("*.tar"))  # with --holdout, nothing directly in OUT


@pytest.mark.parametrize("kind, ext, data, options", [
    ("images", "png", lambda i: png((i, 2 * i, 3 * i)), []),
    ("audio", "wav", lambda i: wav(0.3, 200 + 20 * i), ["--max-seconds", "0.1", "--sample-rate", "4000"]),  # cut: Cut
])
def test_workers_write_the_same_shards_and_skips_as_one_process(tmp_path, caplog, kind, ext, data, options):
    """--workers, as for videos and meshes (the loop they share, writers.ingest): files read in other processes,
    samples written in the same order, a broken file counted and named the same."""
    src = make(tmp_path / "src", {**{f"f{i}.{ext}": data(i) for i in range(7)}, f"bad.{ext}": "not media"})
    for out, workers in (("one", "1"), ("two", "3")):
        with caplog.at_level(logging.INFO):
            assert shards(kind, str(src), str(tmp_path / out), "--shard-size", "3", "--workers", workers, *options) == 0
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(list((tmp_path / "one").glob("*.tar"))) >= 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert caplog.text.count(f"1 skipped: 1 unreadable (bad.{ext})") == 2
    assert caplog.text.count("28 clips from 7 audio files" if options else "7 images in") == 2


# broken files -----------------------------------------------------------------------------------


def test_broken_images_are_skipped_counted_and_named(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(decoders, "MAX_IMAGE_PIXELS", 32 * 32)
    good = png((200, 10, 10))
    src = make(tmp_path / "src", {"good.png": good, "zero.png": b"", "notes.jpg": "not an image",
                                  "cut.png": png((1, 2, 3), (30, 30))[:60], "huge.png": png((5, 5, 5), (40, 40))})
    with caplog.at_level(logging.INFO):
        assert shards("images", str(src), str(tmp_path / "out")) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err + caplog.text
    warnings = {Path(r.args[0]).name: r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert set(warnings) == {"zero.png", "notes.jpg", "cut.png", "huge.png"}  # each named with its path and the reason
    assert "empty file" in warnings["zero.png"] and "not a PNG, JPEG or WebP image" in warnings["notes.jpg"]
    assert "MAX_IMAGE_PIXELS" in warnings["huge.png"] and str(src / "cut.png") in warnings["cut.png"]
    (summary,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and r.levelno == logging.INFO]
    assert summary.startswith("1 image in ")
    assert summary.endswith("4 skipped: 1 too large (huge.png), 3 unreadable (cut.png, notes.jpg, zero.png)")
    samples = by_path(tmp_path / "out")
    assert list(samples) == ["good.png"] and samples["good.png"]["png"] == good  # stored as it was, not re-encoded
    assert json.loads(samples["good.png"]["json"]) == {"path": "good.png", "width": 12, "height": 10}
    assert not (tmp_path / "out/classes.json").exists()  # a flat folder: no classes


def test_zero_byte_wav_is_skipped_counted_and_named(tmp_path, capsys, caplog):
    src = make(tmp_path / "src", {"ok.wav": wav(), "zero.wav": b"", "head.wav": wav()[:44]})  # head.wav: a header, no samples
    with caplog.at_level(logging.INFO):
        assert shards("audio", str(src), str(tmp_path / "out")) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err + caplog.text
    assert f"skipping {src / 'zero.wav'} (unreadable): empty file" in caplog.text
    assert f"skipping {src / 'head.wav'} (unreadable): no samples" in caplog.text
    assert "2 skipped: 2 unreadable (head.wav, zero.wav)" in caplog.text
    (raw,) = by_path(tmp_path / "out").values()
    assert "cls" not in raw and raw["wav"] == (src / "ok.wav").read_bytes()


def test_a_folder_of_only_broken_files_is_one_error_line(tmp_path, capsys):
    make(tmp_path / "src", {"zero.wav": b""})
    assert shards("audio", str(tmp_path / "src"), str(tmp_path / "out")) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "no audio files written" in line and "1 unreadable (zero.wav)" in line


def test_a_folder_that_already_holds_shards_is_refused_in_one_line(tmp_path, capsys):
    """A second run into the same folder would leave the first run's shards beside the new ones, and training
    would read both: every folder command refuses, naming the folder, and writes nothing."""
    src = make(tmp_path / "src", {f"f{i}.png": png((i, 2, 3)) for i in range(3)})
    assert shards("images", str(src), str(tmp_path / "out")) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert shards("images", str(src), str(tmp_path / "out")) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert str(tmp_path / "out") in line and "already holds img-*.tar shards" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
