"""Training speed as the user cares about it: samples/s and tokens/s per device, and MFU when
the peak FLOP/s of the device is known.

Token counts are the joint sequence (generated + context tokens) of each sample, read from the
generator after its step (`last_lengths`), so variable-size packed batches count what really ran.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from models.training import require_run_state


class Throughput(L.Callback):
    def __init__(self, window: int = 20, peak_flops: float | None = None):
        """
        Args:
            window: Average over this many steps.
            peak_flops: Peak FLOP/s of one device for the training dtype (e.g. 989e12 for H100 bf16
                dense); None = no MFU. MFU = 3 * forward FLOPs per token * tokens/s / peak (fwd + 2x bwd).
        """
        self.window = window
        self.peak_flops = peak_flops
        self.t0: float | None = None
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0
        self.padded = 0
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        lengths = list(require_run_state(pl_module, "Throughput").last_lengths)  # joint tokens per sample
        b = len(lengths)
        self.samples += b
        self.tokens += sum(lengths)
        self.flops += 3 * sum(pl_module.backbone.flops_per_token(n) * n for n in lengths)  # fwd + 2x bwd
        self.padded += b * max(lengths, default=0)
        self.steps += 1
        if self.steps < self.window:
            return
        dt = time.perf_counter() - self.t0
        metrics = {
            "perf/samples_per_s": self.samples / dt, "perf/tokens_per_s": self.tokens / dt,
            "perf/step_time_s": dt / self.steps,
            # what padding every batch to its longest sample would waste; packed batches run none of it
            "data/padding_fraction_if_padded": 1.0 - self.tokens / max(self.padded, 1),
        }
        if self.peak_flops:
            metrics["perf/mfu"] = self.flops / dt / self.peak_flops
        # CPU tensors: Lightning would copy each Python float to the device, a blocking copy (a sync) each
        pl_module.log_dict({k: torch.tensor(v) for k, v in metrics.items()}, batch_size=max(b, 1))
        self.t0, self.samples, self.tokens, self.flops, self.padded, self.steps = time.perf_counter(), 0, 0, 0.0, 0, 0
