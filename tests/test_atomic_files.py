"""atomic_write (datamodules/media/files.py), the one way duoflow replaces a file: all of it or none of it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from datamodules.media.files import atomic_write, atomic_write_text, temporaries

OLD = bytes(range(256)) * 64


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path, error: type) -> None:
    target = tmp_path / "stats.json"
    target.write_bytes(OLD)
    seen = []

    def half_then_fail(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half a new file")
        raise error("killed midway")

    with pytest.raises(error):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == OLD
    assert sorted(os.listdir(tmp_path)) == ["stats.json"]  # the temporary is gone
    tmp = seen[0]
    assert tmp.parent == tmp_path and tmp.name.startswith(".stats.json.") and tmp.name.endswith(".tmp")


def test_a_write_replaces_the_file_with_a_plain_files_permissions(tmp_path: Path) -> None:
    target, plain = tmp_path / "model.safetensors", tmp_path / "plain"
    target.write_bytes(OLD)
    plain.write_bytes(b"")
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"new")) == target
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["model.safetensors", "plain"]
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # umask, not 0o600


def test_two_writers_of_one_file_at_once_do_not_clash(tmp_path: Path) -> None:
    """The inner write starts and ends while the outer is midway (two ranks saving the same merged file):
    both temporaries coexist, both renames succeed, the last one wins whole."""
    target = tmp_path / "index.json"
    during = []

    def outer(tmp: Path) -> None:
        tmp.write_text("outer")
        during.append(temporaries(target))
        atomic_write_text(target, "inner")
        during.append(target.read_text())

    atomic_write(target, outer)
    assert len(during[0]) == 1 and during[1] == "inner"
    assert target.read_text() == "outer" and temporaries(target) == []


def test_the_data_is_fsynced_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "sub" / "a.txt", "é\n")  # the missing folder is made
    assert events == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "sub" / "a.txt").read_bytes() == "é\n".encode("utf-8")

