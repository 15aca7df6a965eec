"""Training-step pieces every duoflow LightningModule needs, as plain functions.

- ``adamw_with_warmup``: AdamW with linear LR warm-up from an ``OptimConfig``, as Lightning's
  ``configure_optimizers`` returns it.
- ``all_finite``: the collective non-finite check behind the skip-the-step guard; the values the
  progress bar shows ride along in its one host read.
- ``guarded_step``: backward + (clip, step) or skip, with the counters and logs the guard callback reads.
- ``rng_state`` / ``set_rng_state``: the global RNG streams, stored in checkpoints so a resumed
  run draws the same noise as an uninterrupted one.
- ``RunState``: the LightningModule mixin holding the guard counters and the per-rank training noise,
  and putting them (with the RNGs and the run config) into checkpoints.

Shared by ``FlowMatchingModule`` and ``ShapeAutoencoder``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

log = logging.getLogger("duoflow.train")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    """AdamW weight decay of the matmul weights (norms, biases and embeddings never decay)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps, then constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules whose ``weight`` is a matmul weight: the only parameters weight decay applies to."""


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups as nanoGPT makes them: matmul weights (Linear/Conv ``weight``, attention
    ``in_proj_weight``) decay; biases, norm scales, embeddings (the null class row among them) and
    learned tokens/positions do not: shrinking those towards 0 only removes information."""
    decay: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, DECAYED):
            decay.append(m.weight)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            decay.append(m.in_proj_weight)
    chosen = {id(p) for p in decay}
    params = list(module.parameters())
    return [
        {"params": [p for p in params if id(p) in chosen], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0},
    ]


def adamw_with_warmup(module: nn.Module, optim: OptimConfig) -> dict[str, Any]:
    """AdamW plus a per-step LambdaLR: linear warm-up over ``optim.warmup_steps``, then constant.

    With ``weight_decay > 0`` the parameters split into ``decay_groups``. The update runs as one
    fused kernel per parameter on CUDA and CPU (``fused=True``), whose step counters stay inside the
    kernel (``foreach`` reads each one on the host: one value read per parameter and step), and as
    multi-tensor ``foreach`` ops on other devices."""
    params = list(module.parameters())  # frozen ones too (no grad, never updated), as checkpoints store them
    groups = decay_groups(module, optim.weight_decay) if optim.weight_decay > 0 else params
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                            fused=fused, foreach=not fused)
    warm = max(optim.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def all_finite(
    loss: Tensor, parameters: Iterable[nn.Parameter], shown: Sequence[Tensor] = ()
) -> tuple[bool, list[float]]:
    """True when the loss and every gradient are finite on EVERY rank (a rank skipping alone would
    desynchronise DDP, so this is a collective decision), and the values of `shown` (this rank's
    scalars for the progress bar) read in the same host read: shown as device tensors, Lightning
    would read each one again at every batch end and progress-bar refresh, a stall each."""
    ok = torch.isfinite(loss.detach()).all()
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        # one fused norm per (device, dtype) group instead of a kernel per tensor; float32 so fp16 grads
        # cannot overflow the norm itself
        norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float32)
        ok = ok & torch.isfinite(torch.stack(norms)).all()
    ok = ok.float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    flag, *values = torch.cat([ok, *(v.detach().float().reshape(1) for v in shown)]).tolist()
    return flag > 0, values


def fsdp_root(trainer: Any) -> FSDP | None:
    """The root FSDP module when the trainer's strategy shards the model, else None (also without a trainer)."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, FSDP) else None


def clip_gradients(module: Any, optimizer: Any, max_norm: float) -> None:
    """Scale the gradients so their global 2-norm is at most `max_norm`.

    Under FSDP the root FSDP module clips, because its norm covers every rank's shard. Lightning's FSDP
    precision plugin refuses norm clipping, and torch's `clip_grad_norm_` would only see this rank's
    shard. Everywhere else, Lightning's clipping runs (its precision plugins unscale first where needed)."""
    root = fsdp_root(getattr(module, "_trainer", None))  # module.trainer would raise outside a Trainer
    if root is not None:
        root.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def guarded_step(module: Any, loss: Tensor, batch_size: int, shown: dict[str, Tensor] | None = None) -> bool:
    """Manual-optimization step of a LightningModule with `optim`, `nonfinite_streak`, `nonfinite_total`:
    backward, then clip + optimizer + LR step only when loss and gradients are finite on every rank;
    otherwise the update is skipped and counted (callbacks.guards stops a run of them). Returns
    whether the update was applied (also `module.last_step_applied`). The loss and `shown` (name ->
    scalar) go to the progress bar as host values from the non-finite check's one read."""
    opt, sched = module.optimizers(), module.lr_schedulers()
    module.manual_backward(loss)
    shown = {"train/loss": loss, **(shown or {})}
    applied, values = all_finite(loss, module.parameters(), list(shown.values()))
    if applied:
        if module.optim.grad_clip > 0:
            clip_gradients(module, opt, module.optim.grad_clip)
        opt.step()
        sched.step()
        module.nonfinite_streak = 0
        for name, value in zip(shown, values):
            module.log(name, torch.tensor(value), prog_bar=True, batch_size=batch_size)
    else:
        module.nonfinite_streak += 1
        module.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)",
                    module.global_step, module.nonfinite_streak)
    opt.zero_grad(set_to_none=True)
    # host values logged as CPU tensors: Lightning would make a Python float a device tensor, one
    # blocking host-to-device copy (a sync) per value and step
    module.log("train/skipped_steps", torch.tensor(float(module.nonfinite_total)), batch_size=batch_size)
    module.log("train/lr", torch.tensor(sched.get_last_lr()[0]), batch_size=batch_size)
    module.last_step_applied = applied
    return applied


def host_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for draws the host must read (e.g. the condition-dropout mask): `generator`
    itself when on the CPU (or None: the global RNG), else a CPU one seeded like it, so a batch's
    draws stay a function of its seed."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def require_run_state(module: object, user: str) -> "RunState":
    """``module`` as a RunState, or one error line saying the callback ``user`` needs one."""
    if not isinstance(module, RunState):
        raise TypeError(f"{user} needs a duoflow training module (models.training.RunState: the generators "
                        f"and the shape autoencoder), got {type(module).__name__}")
    return module


def noise_seed(base: int, rank: int, draw: int) -> int:
    """A 63-bit seed for (run seed, rank, draw), well mixed (numpy's SeedSequence) so neighbouring
    ranks and draws get unrelated streams."""
    return int(np.random.SeedSequence([base % 2**64, rank, draw]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """torch, numpy, python and CUDA RNG states; numpy's key array as a tensor (loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RunState:
    """Mixin (before ``L.LightningModule`` in the bases) for every duoflow training module: the
    counters ``guarded_step`` and the guard callback use, the per-rank training noise, and the run
    state a resume needs in checkpoints. Call ``init_run_state()`` in ``__init__``.

    It is also the declared protocol between modules and callbacks: the attributes set in
    ``init_run_state`` are what callbacks read, and ``require_run_state`` checks a module has them."""

    def init_run_state(self) -> None:
        # what the callbacks read (callbacks/guards.py, ema.py, throughput.py) and app/cli.py writes
        self.last_step_applied = False
        """Whether the last training step updated the weights (EMA skips the others)."""
        self.nonfinite_streak = 0
        """Skipped (non-finite) steps in a row (NonFiniteGuard stops a run of them)."""
        self.nonfinite_total = 0
        self.last_lengths: list[int] = []
        """Tokens per sample of the last training batch (Throughput; empty for modules without tokens)."""
        self.duoflow_config: str | None = None
        """The resolved run config as YAML text (set by the CLI before fit), stored in every checkpoint."""
        self.duoflow_run_id: str | None = None
        """The tracker's run id (set by the CLI), stored in checkpoints as a plain string beside the config."""
        self.noise_seed: int | None = None
        """Base seed of the training noise, agreed by all ranks at fit start and kept in checkpoints."""
        self.noise_draws = 0
        """Training batches drawn so far (the third part of each batch's noise seed)."""
        self._noise_gen: torch.Generator | None = None

    def noise_generator(self) -> torch.Generator:
        """The generator of this training batch's random draws, on the module's device.

        Seeded from (noise_seed, rank, batch count): every rank draws its own noise (one global RNG
        seeded alike on every rank, as ``seed_everything`` does, would give every rank the same
        noise), and a resumed run draws exactly what the uninterrupted one would, with no generator
        state to save beyond the counter.
        """
        if self.noise_seed is None:
            self.noise_seed = torch.initial_seed()
        if self._noise_gen is None or self._noise_gen.device != self.device:
            self._noise_gen = torch.Generator(device=self.device)
        self._noise_gen.manual_seed(noise_seed(self.noise_seed, self.global_rank, self.noise_draws))
        self.noise_draws += 1
        return self._noise_gen

    def on_fit_start(self) -> None:
        if self.noise_seed is None:  # a fresh run: every rank takes rank 0's seed (resumes load it)
            self.noise_seed = int(self.trainer.strategy.broadcast(torch.initial_seed(), src=0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["duoflow_nonfinite_total"] = self.nonfinite_total
        checkpoint["duoflow_noise"] = {"seed": self.noise_seed, "draws": self.noise_draws}
        checkpoint["duoflow_rng"] = rng_state()  # the global RNGs too, for anything else that draws from them
        if self.duoflow_config:
            checkpoint["duoflow_config"] = self.duoflow_config  # the resolved run config, as YAML text
        if self.duoflow_run_id:
            checkpoint["duoflow_run_id"] = self.duoflow_run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = int(checkpoint.get("duoflow_nonfinite_total", 0))
        if self._trainer is None:  # loading weights to sample or evaluate, not resuming a fit
            return
        noise = checkpoint.get("duoflow_noise")
        if noise:
            self.noise_seed, self.noise_draws = noise["seed"], int(noise["draws"])
        if checkpoint.get("duoflow_rng"):
            set_rng_state(checkpoint["duoflow_rng"])
