"""Every ingester (`duoflow shards images|audio|videos|audiovideo|shapes`) and the training decode path on
malformed files: zero-byte, truncated, wrong extension, a decompression bomb, a GIF of 20000 frames, unicode
and spaces in names, symlink loops. No traceback; each bad file is counted and named; the good ones are written."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from app.__main__ import main
from datamodules.shards import ShardDataModule
from datamodules.transforms import ImageTransform
from tests.test_data import write_raw_tar
from tests.test_ingest_video import moving_square, two_tones, write_video
from tests.test_shape import cube_mesh
from tests.test_sources import png, wav

UNICODE = "ünï cödé spaced"


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side pixels (10^10: PIL's own bomb guard fires), with a tiny body."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def many_frames_gif(frames: int) -> bytes:
    """An 8x8 GIF of ``frames`` frames of 20 ms (two PIL frames, their blocks repeated): 840 kB for 20000."""
    from PIL import Image

    two = [Image.new("P", (8, 8), i) for i in range(2)]
    for image in two:
        image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    buffer = io.BytesIO()
    two[0].save(buffer, format="GIF", save_all=True, append_images=two[1:], duration=20, loop=0)
    data = buffer.getvalue()
    first = data.index(b"\x21\xf9")  # the graphic control block that opens the first frame
    return data[:first] + data[first:-1] * (frames // 2) + b"\x3b"  # header, the two frames again and again, trailer


def video(tmp_path: Path, sound: bool) -> bytes:
    audio = two_tones(2.0, 16000, 1.0) if sound else None
    return write_video(tmp_path / f"made{sound}.mp4", moving_square(20), fps=10, audio=audio).read_bytes()


def mesh() -> bytes:
    v, quads = cube_mesh()
    return ("".join(f"v {x} {y} {z}\n" for x, y, z in v)
            + "".join("f " + " ".join(str(i + 1) for i in q) + "\n" for q in quads)).encode()


INGESTERS: dict[str, tuple[str, Callable[[Path], bytes], bytes, list[str]]] = {
    # command: (extension, a good file, a file of another kind, extra options)
    "images": ("png", lambda tmp: png((200, 10, 10)), wav(), []),
    "audio": ("wav", lambda tmp: wav(), png((1, 2, 3)), []),
    "videos": ("mp4", lambda tmp: video(tmp, sound=False), wav(), ["--frames", "4", "--size", "16", "--max-frames-read", "1000"]),
    "audiovideo": ("mp4", lambda tmp: video(tmp, sound=True), wav(), ["--frames", "4", "--size", "16"]),
    "shapes": ("obj", lambda tmp: mesh(), png((1, 2, 3)), ["--points", "64", "--queries", "64"]),
}


@pytest.mark.parametrize("command", list(INGESTERS))
def test_ingesters_skip_count_and_name_malformed_files(command: str, tmp_path: Path, capsys, caplog) -> None:
    ext, make_good, other_kind, options = INGESTERS[command]
    good = make_good(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    bad = {f"empty.{ext}": b"", f"cut.{ext}": good[: len(good) // 3], f"text.{ext}": b"no media here\n",
           f"wrong.{ext}": other_kind}
    if command == "images":
        bad[f"bomb.{ext}"] = png_bomb()
    files = {f"good.{ext}": good, f"{UNICODE}.{ext}": good, **bad}
    for name, data in files.items():
        (src / name).write_bytes(data)
    os.symlink(f"self.{ext}", src / f"self.{ext}")  # a link to itself: ELOOP when read
    os.symlink(".", src / "loop")  # a folder link back to SRC: no class folder, no endless walk
    cut_short = command == "videos"
    if cut_short:
        (src / "many.gif").write_bytes(many_frames_gif(20_000))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["shards", command, str(src), str(out), *options])
    stdout, stderr = capsys.readouterr()
    text = stdout + stderr + caplog.text
    assert code == 0 and "Traceback" not in text, text[-3000:]
    summary = next(ln for ln in text.splitlines() if "skipped" in ln and ("unreadable" in ln or "meshes" in ln))
    for name in [*bad, f"self.{ext}"]:
        assert name in summary, (name, summary)  # counted and named in the line that ends the command
    assert "a symlink loop" in caplog.text and str(src / "loop") in caplog.text
    assert not (out / "classes.json").exists()  # the link was not taken for a class folder
    if command == "images":
        assert "1 too large (bomb.png)" in summary and "5 unreadable" in summary
    if cut_short:
        assert "1 video cut short at --max-frames-read=1000 (many.gif)" in summary
    written = []
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            written += [json.loads(tar.extractfile(m).read())["path"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert {f"good.{ext}", f"{UNICODE}.{ext}"} <= {Path(p).name for p in written}, written


def test_training_decode_path_skips_count_and_name_malformed_members(tmp_path: Path, caplog) -> None:
    good = png((100, 100, 100), (16, 16))
    members = {"good": good, UNICODE: good, "empty": b"", "cut": good[: len(good) // 3], "text": b"no image here",
               "wrong": wav(), "bomb": png_bomb()}
    shard = write_raw_tar(tmp_path / "bad.tar", [(f"{key}.png", data) for key, data in members.items()])
    module = ShardDataModule(shard, val_shards=shard, batch_size=1, num_workers=0, max_bad_fraction=1.0,
                             transform=ImageTransform(size=16))
    with caplog.at_level(logging.WARNING, logger="duoflow.data"):
        keys = [key for batch in module.val_dataloader() for key in batch["__key__"]]
    assert keys == ["good", UNICODE]
    for key in ("empty", "cut", "text", "wrong", "bomb"):
        assert f"{shard}:{key}: png:" in caplog.text, key
    assert "MAX_IMAGE_PIXELS" in caplog.text and "5 of 7 bad" in caplog.text
