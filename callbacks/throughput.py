"""Training speed as the user cares about it: samples/s and tokens/s per device, and MFU when
the peak FLOP/s of the device is known."""

from __future__ import annotations

import time

import lightning as L


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
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        x = batch["x"]
        b = len(x)
        n_tok = pl_module.tokenizer.num_tokens(*x.shape[-2:]) if hasattr(pl_module.tokenizer, "num_tokens") else 0
        self.samples += b
        self.tokens += b * n_tok
        self.steps += 1
        if self.steps < self.window:
            return
        dt = time.perf_counter() - self.t0
        metrics = {"perf/samples_per_s": self.samples / dt, "perf/tokens_per_s": self.tokens / dt,
                   "perf/step_time_s": dt / self.steps}
        if self.peak_flops and n_tok:
            flops = 3 * pl_module.backbone.flops_per_token(n_tok) * self.tokens / dt
            metrics["perf/mfu"] = flops / self.peak_flops
        pl_module.log_dict(metrics, batch_size=b)
        self.t0, self.samples, self.tokens, self.steps = time.perf_counter(), 0, 0, 0
