"""What callbacks need under FSDP, where each rank holds a shard of every parameter.

A callback that keeps a value per parameter (EMA) keeps it per shard, and must gather it to save a
checkpoint that any world size can read (clean names, full shapes), and shard it again on resume.
A callback that runs the model outside the training step (previews, evaluation) must run it on
every rank, because each FSDP unit gathers its parameters collectively, and the root's own
parameters (embeddings, final layer) must be gathered around the call. Every function here is
collective under FSDP and a no-op (or the plain value) otherwise.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from models.training import fsdp_root

WRAPPED = "_fsdp_wrapped_module."
"""What FSDP inserts into the parameter names of each wrapped submodule."""


def clean(name: str) -> str:
    """A parameter's name as the unwrapped module spells it (and as checkpoints store it)."""
    return name.replace(WRAPPED, "")


@contextmanager
def _values_in(module: nn.Module, values: dict[str, Tensor]) -> Iterator[dict[str, nn.Parameter]]:
    """The module's parameters hold `values` (keyed as its named_parameters) inside, their own outside."""
    params = dict(module.named_parameters())
    backup = {n: params[n].detach().clone() for n in values}
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)
    try:
        yield params
    finally:
        with torch.no_grad():
            for n, b in backup.items():
                params[n].copy_(b)


def gather_full(root: FSDP, module: nn.Module, shards: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU tensors, under clean names, of per-parameter values held as this rank's shards (keyed as
    `module.named_parameters()` under FSDP). Collective: every rank calls it."""
    with _values_in(module, shards), FSDP.summon_full_params(root, writeback=False):
        return {clean(n): p.detach().cpu().clone() for n, p in module.named_parameters() if n in shards}


def shard_full(root: FSDP, module: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's shards of full tensors under clean names, keyed as `module.named_parameters()`: the
    inverse of `gather_full`. The parameters themselves are left as they were. Collective."""
    held = {n: p.detach().clone() for n, p in module.named_parameters() if clean(n) in full}
    with _values_in(module, held):  # what this rank holds now is put back on the way out
        with FSDP.summon_full_params(root, writeback=True), torch.no_grad():
            for n, p in module.named_parameters():
                if clean(n) in full:
                    p.copy_(full[clean(n)])
        return {n: p.detach().clone() for n, p in module.named_parameters() if n in held}


def runnable(trainer: Any) -> ContextManager[None]:
    """Around a call of the LightningModule's own methods outside the training step (sampling): gathers
    the root's own parameters; the wrapped blocks gather theirs as they run. Every rank must enter it."""
    root = fsdp_root(trainer)
    return nullcontext() if root is None else FSDP.summon_full_params(root, recurse=False, writeback=False)


def all_ranks_run(trainer: Any) -> bool:
    """Whether work on the model must run on every rank (FSDP) rather than on rank 0 alone."""
    return fsdp_root(trainer) is not None
