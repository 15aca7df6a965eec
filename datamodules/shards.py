"""The LightningDataModule that serves WebDataset shards, and ``read_samples`` for metrics and tools.

Shard lists are in ``datamodules/shardlists.py``, the resumable training stream (rank and worker
splits, bad-sample policy, token-budget batches, exact resume) in ``datamodules/stream.py``; the
names configs and code use are re-exported here.

Validation reads every shard once in order; rank r keeps samples r, r + world, ... so every
sample is seen exactly once across ranks.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from datamodules.decoders import decode_sample
from datamodules.media.spec import DescribesMedia
from datamodules.shardlists import (
    count_samples,
    count_tar_samples,
    expand_shards,
    is_remote,
    shard_captions,
    shard_conditions,
)
from datamodules.stream import (
    POSITION_KEY,
    EpochBatches,
    SkipCounter,
    TooManyBadSamples,
    TrainStream,
    budget_batched,
    dist_info,
    split_by_rank,
)
from datamodules.transforms import ImageTransform, SampleTransform, collate

__all__ = ["ShardDataModule", "TooManyBadSamples", "budget_batched", "count_samples", "count_tar_samples", "dist_info",
           "expand_shards", "read_samples", "shard_conditions"]

log = logging.getLogger("duoflow.data")


class ShardDataModule(lightning.LightningDataModule):
    """WebDataset shards -> batches, with the same number of batches on every rank.

    Args:
        train_shards: Brace pattern, glob, folder or list, e.g. ``data/img-{000000..000099}.tar``.
        val_shards: Same for validation; None means no validation loader.
        transform: Decoded sample -> tensors (``class_path`` in YAML); default ``ImageTransform()``.
        batch_size: Samples per batch on each rank.
        num_workers: Dataloader worker processes per rank (0 = in the main process).
        shuffle_buffer: Samples held in each worker's shuffle buffer.
        seed: Seed for the shard order and the shuffle buffers.
        samples_per_epoch: Samples per epoch over all ranks; None counts the train shards.
        max_bad_fraction: Stop when more than this fraction of samples fail to decode.
        batch_budget: Close a training batch before it holds more than this many TOKENS (the
            transform's ``cost``: what the model's tokenizers make of a sample, for every modality;
            audio-video counts video plus audio tokens); ``batch_size`` still caps the samples.
            For mixed sizes: small images or short clips come many to a batch, large ones few. An
            epoch stays ``samples_per_epoch // (batch_size * world_size)`` batches, so set
            ``batch_size`` to the samples a typical batch holds. None: fixed ``batch_size``.

    The transform follows the model: ``setup`` hands it the generator's ``MediaSpec``, so sizes,
    multiples and rates the data config leaves unset come from the model, and token counts use
    the model's patch sizes.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        transform: SampleTransform | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        max_bad_fraction: float = 0.05,
        batch_budget: int | None = None,
    ):
        super().__init__()
        if batch_size <= 0 or num_workers < 0 or shuffle_buffer <= 0 or (batch_budget is not None and batch_budget <= 0):
            raise ValueError(
                f"ShardDataModule: need batch_size > 0, num_workers >= 0, shuffle_buffer > 0, batch_budget > 0 or null; "
                f"got {batch_size}, {num_workers}, {shuffle_buffer}, {batch_budget}"
            )
        self.batch_budget = batch_budget
        self.train_shards, self.val_shards = train_shards, val_shards
        self.transform = transform if transform is not None else ImageTransform()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.samples_per_epoch, self.max_bad_fraction = samples_per_epoch, max_bad_fraction
        self._consumed: dict[int, tuple[int, int]] = {}  # worker -> (epoch, batches) the training loop took
        self._resume: dict[str, Any] = {}  # the data position loaded from a checkpoint

    def setup(self, stage: str) -> None:
        """Hand the model's media spec to the transform (options the data config left unset follow the model)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(module, DescribesMedia):
            self.transform.follow(module.media_spec())

    def preview_captions(self, num: int) -> list[str]:
        """The first ``num`` distinct captions of the validation shards, else of the training shards (see
        ``shard_captions``): the preview prompts of a text model whose config states none."""
        return shard_captions(expand_shards(self.val_shards or self.train_shards), num)

    def train_stream(self, urls: list[str], rank: int, world_size: int) -> TrainStream:
        """The endless training stream of batches for one rank (one epoch per ``batches(epoch)``)."""
        return TrainStream(urls, rank, world_size, self.transform, self.batch_size, self.shuffle_buffer, self.seed,
                           self.max_bad_fraction, self.batch_budget)

    def val_pipeline(self, urls: list[str], rank: int, world_size: int) -> wds.DataPipeline:
        """Every validation sample once across ranks, in shard order, last batch partial."""
        skips = SkipCounter(max_bad_fraction=1.0, rank=rank)
        return wds.DataPipeline(
            [
                wds.SimpleShardList(urls),
                wds.split_by_worker,
                wds.tarfile_to_samples(handler=skips.bad_shard),
                split_by_rank(rank, world_size),
                skips.map(decode_sample),
                skips.map(self.transform),
                skips.passed,
                wds.batched(self.batch_size, collation_fn=collate, partial=True),
            ]
        )

    def batches_per_rank(self, urls: list[str], world_size: int) -> tuple[list[str], int]:
        """(shards worth reading, batches per epoch per rank)."""
        samples = self.samples_per_epoch
        if samples is None:
            if any(is_remote(u) for u in urls):
                raise ValueError(f"cannot count samples in remote shards {self.train_shards!r}; set samples_per_epoch")
            counts = count_samples(urls)
            urls = [u for u in urls if counts[u] > 0]
            samples = sum(counts.values())
            if samples == 0:
                raise ValueError(f"train shards {self.train_shards!r} hold no samples")
        batches = samples // (self.batch_size * world_size)
        if batches == 0:
            raise ValueError(
                f"samples_per_epoch={samples} is less than batch_size*world_size={self.batch_size * world_size}; "
                "expected at least one batch per rank"
            )
        return urls, batches

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        # the loader's own generator: creating its iterator must not draw from the global torch RNG
        # (a resumed run creates one mid-epoch where the uninterrupted run did not)
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = dist_info()
        urls = expand_shards(self.train_shards)
        self.transform.check_shards(urls)  # e.g. latent shards made by other models than the model's: one line
        urls, batches = self.batches_per_rank(urls, world_size)
        start = self.resume_from(batches, world_size)
        self._consumed = {w: (start["epoch"], n) for w, n in enumerate(start["done"])} if start else {}
        return self._loader(EpochBatches(self.train_stream(urls, rank, world_size), batches, start))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        rank, world_size = dist_info()
        return self._loader(self.val_pipeline(expand_shards(self.val_shards), rank, world_size))

    # ---- the data position, saved in checkpoints (Lightning calls state_dict / load_state_dict) ----

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of each training batch the loop takes (and drop the field)."""
        if isinstance(batch, dict) and POSITION_KEY in batch:
            epoch, worker, done = batch.pop(POSITION_KEY).tolist()
            self._consumed[worker] = (epoch, done)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch of the training stream and batches consumed per dataloader worker in it.

        The same on every rank: ranks take equal batch counts, and a worker's batches arrive in a
        fixed round-robin order."""
        if not self._consumed:
            return {**self._resume} if self._resume else {}
        epoch = max(e for e, _ in self._consumed.values())
        workers = max(1, self.num_workers)
        done = [self._consumed[w][1] if w in self._consumed and self._consumed[w][0] == epoch else 0
                for w in range(workers)]
        return {"epoch": epoch, "done": done, "world_size": dist_info()[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def resume_from(self, batches: int, world_size: int) -> dict | None:
        """The stream position to start from: the loaded checkpoint's, moved to the next epoch when complete."""
        state = self._resume
        if not state:
            return None
        workers = max(1, self.num_workers)
        if len(state["done"]) != workers or state.get("world_size", world_size) != world_size:
            log.warning("checkpoint data position was taken with %d worker(s) x %d rank(s), now %d x %d: "
                        "starting the next epoch of the stream", len(state["done"]), state.get("world_size", 0),
                        workers, world_size)
            return {"epoch": state["epoch"] + 1, "done": [0] * workers}
        if sum(state["done"]) >= batches:  # the checkpoint was taken at the end of an epoch
            return {"epoch": state["epoch"] + 1, "done": [0] * workers}
        log.info("resuming the training stream at epoch %d after %d batches", state["epoch"], sum(state["done"]))
        return {"epoch": state["epoch"], "done": list(state["done"])}


def read_samples(shards: str | list[str], transform: SampleTransform, num: int) -> dict[str, Any]:
    """The first `num` samples of the shards (in shard order), transformed and batched into one dict."""
    data = ShardDataModule(shards, transform=transform, batch_size=min(256, num), num_workers=0)
    batches, n = [], 0
    for batch in data.val_pipeline(expand_shards(shards), rank=0, world_size=1):
        batches.append(batch)
        n += len(batch["__key__"])
        if n >= num:
            break
    if not batches:
        raise ValueError(f"shards {shards!r} hold no readable samples")
    out = {}
    for key, first in batches[0].items():
        parts = [b[key] for b in batches]
        out[key] = torch.cat(parts)[:num] if isinstance(first, torch.Tensor) else [v for p in parts for v in p][:num]
    return out
