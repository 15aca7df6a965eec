"""Training the shape autoencoder (models/codecs/shape.py), the first stage of ShapeFlow.

Batches come from ``datamodules.shapes.ShapeTransform``: surface ``points`` (B, N, 3), occupancy
``queries`` (B, M, 3) and labels ``occ`` (B, M). The loss is binary cross-entropy of the
predicted occupancy plus ``kl_weight`` times the KL of the latent posterior to N(0, 1).
IoU is measured on the query points (half uniform in the cube, half near the surface, so it is
stricter than a volumetric IoU). Optimisation is manual, like FlowMatchingModule's: a step whose
loss or gradients are non-finite on any rank is skipped (NonFiniteGuard and EMA read
``nonfinite_streak`` / ``last_step_applied``); the posterior noise is per rank and travels in
checkpoints (``models.training.RunState``).

Legend: B batch, N surface points, M query points, K latents, d latent dim.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from models.codecs.shape import ShapeAEConfig, ShapeCodec
from models.training import OptimConfig, RunState, adamw_with_warmup, guarded_step


def occupancy_iou(logits: Tensor, occ: Tensor) -> Tensor:
    """Per-shape IoU (B,) of predicted (logit > 0) and true occupancy (B, M); 1 when both are empty."""
    pred, true = logits > 0, occ > 0.5
    inter = (pred & true).sum(dim=1).float()
    union = (pred | true).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class ShapeAutoencoder(RunState, L.LightningModule):
    """Point cloud -> latent set -> occupancy, trained with BCE (+ KL); ``codec`` is what ShapeFlow uses."""

    def __init__(self, codec: ShapeAEConfig = ShapeAEConfig(), optim: OptimConfig = OptimConfig(lr=1e-3)):
        """
        Args:
            codec: Sizes of the autoencoder (latents K, latent_dim d, width, layers, KL weight).
            optim: AdamW, warm-up and gradient clipping (the same options as the generators').
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # we decide per step whether to apply it (non-finite guard)
        self.optim = optim
        self.kl_weight = codec.kl_weight
        self.codec = ShapeCodec(codec)
        self.init_run_state()

    def losses(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """bce, kl, loss and per-shape iou (B,) of a batch; with a generator, z is drawn from the
        posterior (training), else it is the posterior mean."""
        mean, logvar = self.codec.posterior(batch["points"])  # (B, K, d) each, unscaled
        z = mean
        if generator is not None and self.kl_weight > 0:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
            z = mean + eps * (0.5 * logvar).exp()
        logits = self.codec.occupancy(z / self.codec.latent_scale, batch["queries"])  # (B, M)
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch["occ"].float())
        kl = kl_to_standard_normal(mean.float(), logvar.float()) if self.kl_weight > 0 else bce.new_zeros(())
        return {"loss": bce + self.kl_weight * kl, "bce": bce, "kl": kl,
                "iou": occupancy_iou(logits.detach(), batch["occ"]), "mean": mean.detach()}

    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(self, self.optim)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.losses(batch, self.noise_generator())
        loss, b = out["loss"], len(batch["points"])
        if guarded_step(self, loss, batch_size=b, shown={"train/iou": out["iou"].mean()}):
            self.codec.update_latent_scale(out["mean"])
            self.log_dict({"train/bce": out["bce"].detach(), "train/kl": out["kl"].detach(),
                           "train/latent_scale": self.codec.latent_scale}, batch_size=b)
        return loss.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.losses(batch)
        b = len(batch["points"])
        self.log("val/loss", out["bce"], prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/iou", out["iou"].mean(), prog_bar=True, batch_size=b, sync_dist=True)
        return out["bce"]
