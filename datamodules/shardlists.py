"""Shard lists: brace patterns, globs and folders -> shard files, and how many samples each holds."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from datamodules.writers import CLASSES_NAME, INDEX_NAME


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, globs, directories (their ``*.tar``) or lists of these -> existing shard files.

    Remote URLs (``pipe:...``, ``s3://...``) pass through unchecked.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    missing: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            if is_remote(url):
                urls.append(url)
            elif os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"shard folder {url!r} (from {spec!r}) holds no *.tar files")
                urls.extend(found)
            elif glob.has_magic(url):
                found = sorted(p for p in glob.glob(url) if os.path.isfile(p))
                if not found:
                    raise FileNotFoundError(f"no shard matches {url!r} (from {spec!r}); expected tar files")
                urls.extend(found)
            elif not os.path.isfile(url):
                missing.append(url)
            else:
                urls.append(url)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) from {spec!r} do not exist: {shown}; expected tar files")
    if not urls:
        raise ValueError(f"shard spec {spec!r} is empty; expected a pattern such as 'data/img-{{000000..000009}}.tar'")
    return urls


def count_tar_samples(path: str) -> int:
    """Samples in one tar: runs of members with the same key, as ``tarfile_to_samples`` groups them.

    A tar cut short counts the samples whose headers are readable (training reads on past it)."""
    count, last = 0, None
    with tarfile.open(path, mode="r:*") as tar:
        try:
            for info in tar:
                if not info.isreg():
                    continue
                key, _ = base_plus_ext(info.name)
                name = os.path.basename(info.name)
                if key is None or (name.startswith("__") and name.endswith("__")):
                    continue
                if key != last:
                    count, last = count + 1, key
        except (tarfile.ReadError, EOFError):
            pass
    return count


def count_samples(urls: list[str]) -> dict[str, int]:
    """Sample count per shard, from ``index.json`` next to the shards when listed there, else from the tar headers."""
    indexes: dict[Path, dict[str, int]] = {}
    counts = {}
    for url in urls:
        folder = Path(url).parent
        if folder not in indexes:
            index_path = folder / INDEX_NAME
            indexes[folder] = json.loads(index_path.read_text()).get("shards", {}) if index_path.exists() else {}
        name = Path(url).name
        counts[url] = indexes[folder][name] if name in indexes[folder] else count_tar_samples(url)
    return counts


def first_sample_fields(url: str) -> set[str]:
    """The fields (member extensions) of the first sample of a local shard, read from its first members."""
    fields, first = set(), None
    with tarfile.open(url, mode="r:*") as tar:
        for info in tar:
            key, ext = base_plus_ext(info.name)
            if not info.isreg() or key is None or os.path.basename(info.name).startswith("__"):
                continue
            if first is not None and key != first:
                break
            first = key
            fields.add(ext)
    return fields


def shard_classes(urls: list[str]) -> list[str] | None:
    """The class names in classes.json beside the first shard (written by `duoflow shards`), or None."""
    names = Path(urls[0]).parent / CLASSES_NAME
    return json.loads(names.read_text()) if names.is_file() else None


def shard_conditions(urls: list[str]) -> dict:
    """What conditioning the shards offer: ``classes`` (names from classes.json beside them, or None), and
    whether their first sample has a class label (``labels``) and a caption or cached caption embeddings
    (``captions``); ``{"empty": True}`` when the first shard holds no sample; {} for remote shards
    (nothing is read from them here)."""
    if not urls or is_remote(urls[0]):
        return {}
    fields = first_sample_fields(urls[0])
    if not fields:
        return {"empty": True}
    return {"classes": shard_classes(urls), "labels": "cls" in fields,
            "captions": "txt" in fields or "text.safetensors" in fields}


def preview_captions(val_shards: str | list[str] | None, train_shards: str | list[str], num: int) -> list[str]:
    """The first ``num`` distinct captions of the validation shards, else of the training shards: the preview
    prompts of a text model whose config states none (in training, and in ``sample`` without --prompt)."""
    return shard_captions(expand_shards(val_shards or train_shards), num)


def shard_captions(urls: list[str], num: int) -> list[str]:
    """The first ``num`` distinct captions (``txt`` members) of local shards, in shard order: deterministic
    preview prompts that speak the data's language. Fewer when the shards hold fewer; remote shards are not read."""
    captions: dict[str, None] = {}
    for url in urls:
        if is_remote(url) or len(captions) >= num:
            break
        with tarfile.open(url, mode="r:*") as tar:
            for info in tar:
                if info.isreg() and base_plus_ext(info.name)[1] == "txt":
                    text = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
                    if text:
                        captions.setdefault(text)
                    if len(captions) >= num:
                        break
    return list(captions)
