"""The shared flow-matching LightningModule and the thin per-modality generators.

Letters: B batch, N tokens, P values per token, D model width, L context tokens.

`FlowMatchingModule` owns everything every modality shares: the backbone, the condition
encoder, the training step (rectified flow, t=0 data / t=1 noise, see models/flow.py), the
non-finite step guard, the optimizer and LR warm-up, and sampling with classifier-free
guidance. A modality is a tokenizer, a codec and a media writer on top.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from models import flow, media
from models.backbone import MMDiT, MMDiTConfig
from models.codecs.identity import Identity
from models.conditioning import ClassLabel, Condition, Unconditional
from models.tokenizers.base import Tokenizer
from models.tokenizers.image import ImagePatches

log = logging.getLogger("duoflow.train")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps, then constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


def numpy_rng_state() -> tuple:
    """numpy's global RNG state with its key array as a tensor (loadable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class FlowMatchingModule(L.LightningModule):
    """Rectified-flow training and sampling for one generated stream plus a context stream."""

    media_suffix: ClassVar[str] = ".pt"

    def __init__(
        self,
        tokenizer: Tokenizer,
        backbone: MMDiTConfig = MMDiTConfig(),
        conditioning: Condition = Unconditional(),
        codec: nn.Module | None = None,
        timesteps: flow.TimestepSampler = flow.LogitNormalT(),
        sampler: flow.Sampler = flow.Euler(steps=50),
        shift: float = 1.0,
        cond_drop: float = 0.1,
        cfg_scale: float = 1.0,
        optim: OptimConfig = OptimConfig(),
    ):
        """
        Args:
            tokenizer: Patchify/unpatchify of the modality's latent (its positions feed RoPE).
            backbone: The MM-DiT; `streams` must be 2 here ([x, ctx]).
            conditioning: What the model is conditioned on (ClassLabel, ByteText, Unconditional).
            codec: First stage (encode data to the latent the flow runs in); None = identity (pixels).
            timesteps: Training-time t distribution (LogitNormalT, UniformT, ModeT, UShapedT).
            sampler: ODE solver and step count for sampling (Euler, Heun; optional sway).
            shift: Resolution shift t' = s t / (1 + (s - 1) t), applied in training and sampling alike
                (it replaces the sampler's own `shift`, so both always match).
            cond_drop: Probability of replacing the condition by the null condition (enables CFG).
            cfg_scale: Default classifier-free guidance scale at sampling (1 = no guidance).
            optim: AdamW, warm-up and gradient clipping.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # we decide per step whether to apply it (non-finite guard)
        self.tokenizer = tokenizer
        self.cfg = backbone
        self.timesteps = timesteps
        self.sampler = sampler
        self.shift = shift
        self.cond_drop = cond_drop
        self.cfg_scale = cfg_scale
        self.optim = optim
        self.check_streams(backbone)
        self.codec = codec if codec is not None else Identity()
        self.cond = conditioning.build(backbone.dim)
        self.backbone = MMDiT(backbone)
        self.x_in = nn.Linear(tokenizer.token_dim, backbone.dim)
        self.x_out = nn.Linear(backbone.dim, tokenizer.token_dim)
        nn.init.zeros_(self.x_out.weight)  # the model predicts v = 0 at init, like adaLN-Zero blocks
        nn.init.zeros_(self.x_out.bias)
        self.last_step_applied = False
        self.nonfinite_streak = 0
        self.nonfinite_total = 0

    def check_streams(self, cfg: MMDiTConfig) -> None:
        if cfg.streams != 2 or cfg.out_streams != 1:
            raise ValueError(
                f"model.backbone.streams={cfg.streams}, out_streams={cfg.out_streams}: "
                f"{type(self).__name__} needs streams=2 ([x, ctx]) and out_streams=1"
            )

    # ---- the model -------------------------------------------------------------------

    def velocity(self, x_t: Tensor, t: Tensor, cond: dict[str, Any], drop: Tensor) -> Tensor:
        """Predicted velocity v(x_t, t | cond) in the latent's own shape."""
        tokens, pos = self.tokenizer.tokenize(x_t)  # (B, N, P), (B, N, A)
        ctx, pooled = self.cond(cond, drop)  # (B, L, D), (B, D)
        (h,) = self.backbone([self.x_in(tokens), ctx], t, pooled, [pos, None])
        return self.tokenizer.untokenize(self.x_out(h), tuple(x_t.shape))

    def encode(self, batch: dict[str, Any]) -> Tensor:
        with torch.no_grad():
            return self.codec.encode(batch["x"])

    @staticmethod
    def conditions(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("cls", "txt") if k in batch}

    def loss(self, batch: dict[str, Any]) -> Tensor:
        x_0 = self.encode(batch)
        b = x_0.shape[0]
        t = flow.shift_t(self.timesteps(b, device=x_0.device), self.shift)
        eps = torch.randn_like(x_0)
        drop = flow.drop_mask(b, self.cond_drop, device=x_0.device)
        v = self.velocity(flow.interpolate(x_0, eps, t), t, self.conditions(batch), drop)
        return flow.flow_loss(v.float(), flow.velocity_target(x_0, eps).float())

    # ---- training ----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        o = self.optim
        opt = torch.optim.AdamW(self.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        warm = max(o.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def all_finite(self, loss: Tensor) -> bool:
        """True when loss and every gradient are finite on EVERY rank (a collective decision:
        a rank that skipped alone would desynchronise DDP)."""
        ok = torch.isfinite(loss.detach()).all()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            ok = ok & torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all()
        ok = ok.float().reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        loss = self.loss(batch)
        self.manual_backward(loss)
        self.last_step_applied = self.all_finite(loss)
        if self.last_step_applied:
            if self.optim.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            sched.step()
            self.nonfinite_streak = 0
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["x"]))
        else:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)",
                        self.global_step, self.nonfinite_streak)
        opt.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", float(self.nonfinite_total), batch_size=len(batch["x"]))
        self.log("train/lr", sched.get_last_lr()[0], batch_size=len(batch["x"]))
        return loss.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(batch_idx)  # same t and noise every validation
        x_0 = self.encode(batch)
        b = x_0.shape[0]
        t = flow.shift_t(self.timesteps(b, generator=gen).to(x_0.device), self.shift)
        eps = torch.randn(x_0.shape, generator=gen).to(x_0)
        no_drop = torch.zeros(b, dtype=torch.bool, device=x_0.device)
        v = self.velocity(flow.interpolate(x_0, eps, t), t, self.conditions(batch), no_drop)
        loss = flow.flow_loss(v.float(), flow.velocity_target(x_0, eps).float())
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["duoflow_nonfinite_total"] = self.nonfinite_total
        # t, noise and condition dropout come from the global RNGs: a resumed run continues their streams
        checkpoint["duoflow_rng"] = {
            "torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        if getattr(self, "duoflow_config", None):
            checkpoint["duoflow_config"] = self.duoflow_config  # the resolved run config, as YAML text

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = int(checkpoint.get("duoflow_nonfinite_total", 0))
        rng = checkpoint.get("duoflow_rng")
        if rng and self._trainer is not None:  # resuming a fit, not loading weights for sampling
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ---- sampling ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        cond: dict[str, Any],
        num: int,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> Tensor:
        """Sample `num` latents from noise with the ODE sampler and decode them to media tensors."""
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        sampler = self.sampler if steps is None else replace(self.sampler, steps=steps)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_1 = torch.randn((num, *self.tokenizer.latent_shape()), generator=gen).to(self.device)
        keep = torch.zeros(num, dtype=torch.bool, device=self.device)
        both = {k: (list(v) * 2 if isinstance(v, (list, tuple)) else torch.cat([v, v])) for k, v in cond.items()}
        both_drop = torch.cat([keep, ~keep])

        def v_fn(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(self.device).expand(x.shape[0])
            if scale == 1.0:
                return self.velocity(x, t, cond, keep)
            v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), both, both_drop)
            v_cond, v_uncond = v.chunk(2)
            return flow.cfg_velocity(v_cond, v_uncond, scale)

        x_0 = sampler(v_fn, x_1, shift=self.shift, progress=progress)
        return self.codec.decode(x_0)

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        """Write generated media to files; returns their paths (a preview last, when there is one)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{prefix}{self.media_suffix}"
        torch.save(x.cpu(), path)
        return [path]

    def log_media(self, logger: Any, paths: list[Path], step: int) -> None:
        """Send the preview to the experiment tracker (W&B) when the logger can take it."""
        log_image = getattr(logger, "log_image", None)
        if log_image is not None and paths and paths[-1].suffix == ".png":
            log_image(key="samples", images=[str(paths[-1])], step=step)


class ImageFlow(FlowMatchingModule):
    """Class- or text-conditional image generator (pixel space by default)."""

    media_suffix = ".png"

    def __init__(
        self,
        tokenizer: ImagePatches = ImagePatches(),
        conditioning: Condition = ClassLabel(),
        **kwargs: Any,
    ):
        super().__init__(tokenizer=tokenizer, conditioning=conditioning, **kwargs)

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        return media.save_images(x, out_dir, prefix, upscale=max(1, 256 // x.shape[-1]))
