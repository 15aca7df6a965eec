"""Reading shards back in tests, member by member (what the shard writers produced, byte for byte)."""

from __future__ import annotations

import tarfile
from pathlib import Path


def shard_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every shard in ``folder``."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples
