"""Files written whole or not at all: a unique temporary file beside the target, fsync, atomic rename.

A reader never sees half a file, and a writer that fails or is interrupted midway (an exception, a full disk,
Ctrl-C) leaves the previous file byte for byte and removes its temporary file; only SIGKILL or a power cut
leaves one, named ``.{name}.{random}.tmp`` beside the target (``temporaries`` finds them). The temporary file
sits in the target's folder because a rename is only atomic within one file system; its name is unique, so
two processes writing the same file at once (two ranks saving the same merged statistics) do not clash: the
last rename wins and each leaves a whole file. The file data and then the rename are fsynced, so after a
crash the target holds the old or the new content, never an empty file.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Make `path` by calling ``write(tmp)``, which writes the whole content to the (existing, empty) file
    `tmp`; then fsync and rename it over `path`. Creates missing parent folders; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # make the rename itself durable
    except BaseException:  # KeyboardInterrupt and SystemExit too: never leave a temporary behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8 to `path`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files of `path`'s writes still on disk: a killed writer's, or one writing now."""
    path = Path(path)
    pattern = f".{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}"
    return sorted(p for p in path.parent.glob(pattern) if p.is_file())


def _new_temporary(path: Path) -> Path:
    """A new empty file beside `path` with a name no other writer holds (O_EXCL), with the permissions a plain
    ``open(path, "w")`` would give (0o666 less the umask; tempfile.mkstemp's 0o600 would hide a checkpoint or
    a shard's statistics from the rest of a group)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name} after 100 tries")


def _fsync(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk; Linux syncs the inode whichever descriptor asks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
