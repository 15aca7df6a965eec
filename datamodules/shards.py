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
from datamodules.epochs import epoch_layouts
from datamodules.media.spec import DescribesMedia
from datamodules.shardlists import (
    count_samples,
    count_tar_samples,
    expand_shards,
    is_remote,
    preview_captions,
    shard_conditions,
)
from datamodules.stream import (
    POSITION_KEY,
    EpochBatches,
    SkipCounter,
    TooManyBadSamples,
    TrainStream,
    all_ranks,
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
        samples_per_epoch: Samples per epoch over all ranks; None: the train shards' sample count (each
            epoch is then one pass over the data). Needed for remote shards (nothing is counted there).
        max_bad_fraction: Stop when more than this fraction of samples fail to decode.
        batch_budget: Close a training batch before it holds more than this many TOKENS (the
            transform's ``cost``: what the model's tokenizers make of a sample, for every modality;
            audio-video counts video plus audio tokens); ``batch_size`` still caps the samples.
            For mixed sizes: small images or short clips come many to a batch, large ones few. An
            epoch stays ``samples_per_epoch // (batch_size * world_size)`` batches, so set
            ``batch_size`` to the samples a typical batch holds. None: fixed ``batch_size``.

    Epochs, the every-sample-once guarantees and resuming on other ranks x workers: ``datamodules/stream.py``.

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
        self._consumed: dict[int, tuple[int, int, int]] = {}  # worker -> (epoch, batches, positions) the loop took
        self._start: dict[str, Any] = {}  # where this run's stream started (resume_from)
        self._epoch_shape: dict[str, int] = {}  # batch size and samples per epoch the positions refer to
        self._resume: dict[str, Any] = {}  # the data position loaded from a checkpoint

    def setup(self, stage: str) -> None:
        """Hand the model's media spec to the transform (options the data config left unset follow the model)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(module, DescribesMedia):
            self.transform.follow(module.media_spec())

    def preview_captions(self, num: int) -> list[str]:
        """The preview prompts of a text model whose config states none (``shardlists.preview_captions``)."""
        return preview_captions(self.val_shards, self.train_shards, num)

    def train_stream(self, urls: list[str], rank: int, world_size: int) -> TrainStream:
        """This rank's training stream (one epoch per ``batches(epoch, ...)``)."""
        counts, samples = self.epoch_samples(urls)
        if samples // (self.batch_size * world_size) == 0:
            raise ValueError(
                f"samples_per_epoch={samples} is less than batch_size*world_size={self.batch_size * world_size}; "
                "expected at least one batch per rank"
            )
        return TrainStream(list(counts) if counts else urls, counts, samples, rank, world_size, self.transform,
                           self.batch_size, self.shuffle_buffer, self.seed, self.max_bad_fraction, self.batch_budget)

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

    def epoch_samples(self, urls: list[str]) -> tuple[dict[str, int] | None, int]:
        """(samples per non-empty shard, None for remote shards; samples per epoch)."""
        if any(is_remote(u) for u in urls):
            if self.samples_per_epoch is None:
                raise ValueError(f"cannot count samples in remote shards {self.train_shards!r}; set samples_per_epoch")
            return None, self.samples_per_epoch
        counts = {url: n for url, n in count_samples(urls).items() if n > 0}
        if not counts:
            raise ValueError(f"train shards {self.train_shards!r} hold no samples")
        return counts, sum(counts.values()) if self.samples_per_epoch is None else self.samples_per_epoch

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
        stream = self.train_stream(urls, rank, world_size)
        self._epoch_shape = stream.epoch_shape
        workers = max(1, self.num_workers)
        self._start = start = self.resume_from(stream, workers) or {}
        self._consumed = {w: (start["epoch"], d, n) for w, (d, n) in enumerate(zip(start["done"], start["samples"]))
                          } if start else {}
        return self._loader(EpochBatches(stream, stream.layouts(0, [], workers)[1].batches, start))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        rank, world_size = dist_info()
        return self._loader(self.val_pipeline(expand_shards(self.val_shards), rank, world_size))

    # ---- the data position, saved in checkpoints (Lightning calls state_dict / load_state_dict) ----

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of each training batch the loop takes (and drop the field)."""
        if isinstance(batch, dict) and POSITION_KEY in batch:
            epoch, worker, done, used = batch.pop(POSITION_KEY).tolist()
            self._consumed[worker] = (epoch, done, used)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's epoch, batches taken per dataloader worker (the same on every rank: ranks
        take equal batch counts, a worker's batches arrive in a fixed round-robin order), positions used
        per reader (gathered from all ranks), and the layouts of the epoch before resumes on other sizes."""
        if not self._consumed:
            return {**self._resume} if self._resume else {}
        epoch = max(e for e, _, _ in self._consumed.values())
        now = [self._consumed[w][1:] if w in self._consumed and self._consumed[w][0] == epoch else (0, 0)
               for w in range(max(1, self.num_workers))]
        history = self._start.get("history", []) if self._start.get("epoch") == epoch else []
        return {"epoch": epoch, "done": [d for d, _ in now], "world_size": dist_info()[1],
                "samples": [n for rank in all_ranks([n for _, n in now]) for n in rank], "history": history,
                **self._epoch_shape}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def resume_from(self, stream: TrainStream, workers: int) -> dict | None:
        """Where this rank's stream starts: the checkpoint's position (``EpochBatches`` ``start``).

        Same ranks x workers: each reader goes on in its own order. Other sizes: the rest of the epoch
        is dealt to the new readers (``epochs.deal``). A finished epoch, a position this version
        cannot place, or remote shards on other sizes: the next epoch."""
        state = self._resume
        if not state:
            return None
        epoch, done = int(state["epoch"]), list(state["done"])
        then = (int(state.get("world_size", stream.world_size)), len(done))
        following = {"epoch": epoch + 1, "history": [], "done": [0] * workers, "samples": [0] * workers}
        if "samples" not in state:
            log.warning("checkpoint data position is from an older duoflow: starting epoch %d of the stream", epoch + 1)
            return following
        shape = stream.epoch_shape
        if any(state.get(key, value) != value for key, value in shape.items()):
            log.warning("checkpoint data position was taken with batch_size %s and %s samples per epoch, now %d and "
                        "%d: starting epoch %d of the stream", state.get("batch_size"), state.get("epoch_samples"),
                        *shape.values(), epoch + 1)
            return following
        history = list(state.get("history", []))
        if sum(done) >= epoch_layouts(history, *then, stream.batch_size, stream.samples)[1].batches:
            return following  # the checkpoint was taken at the end of an epoch
        positions = list(state["samples"])
        if len(positions) != then[0] * then[1]:  # not gathered (no process group): exact for fixed batches
            log.warning("checkpoint holds reader positions of one rank only: assuming full batches on every rank")
            positions = [d * stream.batch_size for d in done] * then[0]
        if then == (stream.world_size, workers):
            log.info("resuming the training stream at epoch %d after %d batches", epoch, sum(done))
            mine = positions[stream.rank * workers:(stream.rank + 1) * workers]
            return {"epoch": epoch, "history": history, "done": done, "samples": mine}
        if stream.counts is None:
            log.warning("checkpoint data position was taken with %d rank(s) x %d worker(s), now %d x %d, on remote "
                        "shards (no sample counts): starting epoch %d of the stream", *then, stream.world_size,
                        workers, epoch + 1)
            return following
        history.append({"world_size": then[0], "workers": then[1], "samples": positions})
        _, layout, dropped = stream.layouts(epoch, history, workers)
        log.warning("checkpoint data position was taken with %d rank(s) x %d worker(s), now %d x %d: the rest of "
                    "epoch %d is dealt anew, %d batches per rank; %d samples that fill no batch on every rank are "
                    "dropped", *then, stream.world_size, workers, epoch, layout.batches, dropped)
        if layout.batches == 0:
            return following
        return {"epoch": epoch, "history": history, "done": [0] * workers, "samples": [0] * workers}


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
