"""The loop both encode commands run: read shards in order, batch like-shaped samples, run a frozen model
on each batch, write what it returns.

``shards encode`` (app/encode.py: media -> latents of pretrained autoencoders and text encoders, one output
shard per input shard, ranks, resume) and ``shards encode-shapes`` (app/shape_latents.py: shape shards ->
latent sets of a trained shape autoencoder) differ in the model, the output layout and the bookkeeping
around the loop, not in the loop itself: that lives here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import webdataset as wds
from tqdm import tqdm

from datamodules.decoders import BadSample, decode_sample

log = logging.getLogger("duoflow.encode")

KEPT_FIELDS = ("cls", "txt", "json")
"""Fields of a source sample both commands store unchanged beside its latents."""
T = TypeVar("T")
Pair = tuple[dict, T]
"""(the decoded sample, what the model reads from it)."""


def read_shard(url: str, transform: Callable[[dict], T], bad: list[str]) -> Iterator[Pair[T]]:
    """(decoded sample, transformed sample) of one shard in order; bad samples (a BadSample from decoding or
    from ``transform``, an unreadable part of the tar) appended to ``bad``, logged and skipped."""
    def broken_tar(exn: Exception) -> bool:
        bad.append(f"{url}: {type(exn).__name__}: {exn}")
        log.warning("encode: unreadable part of %s: %s", url, exn)
        return True  # keep going with what can be read

    for raw in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=broken_tar)):
        try:
            decoded = decode_sample(raw)
            yield decoded, transform(decoded)
        except BadSample as exn:
            bad.append(str(exn))
            log.warning("encode: skipped bad sample %s", exn)


def encode_in_batches(urls: Iterable[str], transform: Callable[[dict], T], shape: Callable[[T], Hashable],
                      encode: Callable[[list[Pair[T]]], list[dict[str, Any]]], write: Callable[[dict[str, Any]], Any],
                      batch_size: int, bar: tqdm, bad: list[str]) -> None:
    """Every sample of ``urls`` in order through ``transform`` (bad ones in ``bad``, see read_shard), batched
    while ``shape`` agrees (a model batch holds one shape) up to ``batch_size``; each batch through ``encode``,
    the samples it returns passed to ``write`` in order, and ``bar`` advanced by the samples read."""
    batch: list[Pair[T]] = []

    def flush() -> None:
        for stored in encode(batch):
            write(stored)
        bar.update(len(batch))
        batch.clear()

    for url in urls:
        for pair in read_shard(url, transform, bad):
            if batch and (len(batch) >= batch_size or shape(pair[1]) != shape(batch[0][1])):
                flush()
            batch.append(pair)
    if batch:
        flush()
