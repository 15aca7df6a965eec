"""Shape autoencoder: point cloud -> a small set of latent vectors -> occupancy field (3DShape2VecSet).

Encoder: K learned query vectors cross-attend to the Fourier-embedded surface points, a few
self-attention blocks follow, and a linear head gives a diagonal Gaussian per latent (KL
bottleneck, as 3DShape2VecSet and CLAY; ``kl_weight = 0`` makes it a plain deterministic
bottleneck). Decoder: the latents go back to width C through self-attention blocks; each query
point, Fourier-embedded, cross-attends to them and a linear head gives its occupancy logit.

Latent space: ``encode`` returns the posterior mean divided by ``latent_scale`` (the RMS of the
posterior means over the training data, tracked while the autoencoder trains), so the flow sees
latents of about unit variance; ``occupancy`` and ``decode`` take latents in that same scaled space.

Legend: B batch, N surface points, M query points, K latents, d latent dim, C width,
H heads, D head dim (C = H * D), R grid side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from models.attention import RMSNorm, select_kernel
from models.blocks import Mlp
from models.checkpoints import load_checkpoint
from models.codecs.base import Codec
from models.codecs.shape_config import ShapeAEConfig


class FourierEmbed(nn.Module):
    """xyz (..., 3) in [-1, 1] -> (..., C): [xyz, sin(2^k pi xyz), cos(2^k pi xyz)] then a Linear."""

    def __init__(self, bands: int, width: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(bands), persistent=False)
        self.proj = nn.Linear(3 * (1 + 2 * bands), width)

    def forward(self, xyz: Tensor) -> Tensor:
        angles = rearrange(xyz[..., None] * self.freqs, "... c f -> ... (c f)")  # (..., 3 bands)
        return self.proj(torch.cat([xyz, angles.sin(), angles.cos()], dim=-1))


class Attention(nn.Module):
    """Multi-head attention of x over ctx (ctx = x: self-attention) with QK RMSNorm."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.q_norm, self.k_norm = RMSNorm(width // heads), RMSNorm(width // heads)
        self.proj = nn.Linear(width, width)
        self.attend = select_kernel("auto")  # chosen once, here, not per call

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        q = self.q_norm(rearrange(self.q(x), "b m (h e) -> b m h e", h=self.heads))  # (B, M, H, D)
        k, v = rearrange(self.kv(ctx), "b n (two h e) -> two b n h e", two=2, h=self.heads)  # (B, N, H, D)
        out = self.attend(q, self.k_norm(k), v)  # (B, M, H, D), dense
        return self.proj(rearrange(out, "b m h e -> b m (h e)"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm x, norm ctx), then x + mlp(norm x); self-attention without ctx."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross: bool = False) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width) if cross else None
        self.attn = Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        h = self.norm_x(x)
        x = x + self.attn(h, h if self.norm_ctx is None else self.norm_ctx(ctx))
        return x + self.mlp(self.norm_mlp(x))


class ShapeCodec(nn.Module):
    """Point cloud (B, N, 3) <-> latent set (B, K, d) -> occupancy logits at any query points."""

    def __init__(self, cfg: ShapeAEConfig = ShapeAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.point_embed = FourierEmbed(cfg.fourier_bands, c)
        self.queries = nn.Parameter(torch.randn(cfg.latents, c) * 0.02)  # (K, C) learned latent queries
        self.encoder_cross = Block(c, cfg.heads, cfg.mlp_ratio, cross=True)
        self.encoder_self = nn.ModuleList(Block(c, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.enc_self_layers))
        self.to_moments = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * cfg.latent_dim))
        self.from_latent = nn.Linear(cfg.latent_dim, c)
        self.decoder_self = nn.ModuleList(Block(c, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.dec_layers))
        self.query_embed = FourierEmbed(cfg.fourier_bands, c)
        self.decoder_cross = Block(c, cfg.heads, cfg.mlp_ratio, cross=True)
        self.to_logit = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 1))
        self.register_buffer("latent_scale", torch.ones(()))  # RMS of the posterior means (module docstring)
        self.register_buffer("scale_updates", torch.zeros((), dtype=torch.long))

    # ---- encoder ---------------------------------------------------------------------

    def posterior(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Surface points (B, N, 3) -> unscaled posterior (mean, logvar), each (B, K, d)."""
        x = self.queries.expand(points.shape[0], -1, -1)  # (B, K, C)
        x = self.encoder_cross(x, self.point_embed(points))
        for block in self.encoder_self:
            x = block(x)
        mean, logvar = self.to_moments(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, points: Tensor) -> Tensor:
        """Surface points (B, N, 3) -> scaled latents (B, K, d): the posterior mean over latent_scale."""
        return self.posterior(points)[0] / self.latent_scale

    @torch.no_grad()
    def update_latent_scale(self, mean: Tensor, momentum: float = 0.01) -> None:
        """Track the RMS of unscaled posterior means: a running mean at first, then an EMA with ``momentum``.
        The rate is computed where the counter lives (read on the host, it would stall a GPU each step)."""
        rms = mean.detach().float().pow(2).mean().sqrt()
        rate = (1.0 / (self.scale_updates + 1).to(self.latent_scale)).clamp(min=momentum)
        self.latent_scale.lerp_(rms.to(self.latent_scale), rate)
        self.scale_updates += 1

    # ---- decoder ---------------------------------------------------------------------

    def latent_tokens(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, K, d) -> decoder tokens (B, K, C), computed once per shape."""
        x = self.from_latent(latents * self.latent_scale)
        for block in self.decoder_self:
            x = block(x)
        return x

    def query(self, tokens: Tensor, queries: Tensor) -> Tensor:
        """Decoder tokens (B, K, C) and query points (B, M, 3) -> occupancy logits (B, M)."""
        h = self.decoder_cross(self.query_embed(queries), tokens)  # (B, M, C)
        return self.to_logit(h)[..., 0]

    def occupancy(self, latents: Tensor, queries: Tensor) -> Tensor:
        """Scaled latents (B, K, d) and query points (B, M, 3) in [-1, 1] -> occupancy logits (B, M)."""
        return self.query(self.latent_tokens(latents), queries)

    @torch.no_grad()
    def decode(self, latents: Tensor, resolution: int = 32) -> Tensor:
        """Scaled latents (B, K, d) -> occupancy probabilities (B, R, R, R) on the grid of datamodules/media/mesh.py."""
        tokens = self.latent_tokens(latents)
        axis = torch.as_tensor(np.linspace(-1.0, 1.0, resolution), dtype=tokens.dtype, device=tokens.device)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # (R^3, 3)
        grid = grid.expand(latents.shape[0], -1, -1)
        logits = torch.cat([self.query(tokens, grid[:, s : s + self.cfg.chunk])
                            for s in range(0, grid.shape[1], self.cfg.chunk)], dim=1)  # (B, R^3)
        return logits.sigmoid().reshape(-1, resolution, resolution, resolution)


def load_shape_codec(ckpt: str, map_location: str = "cpu") -> ShapeCodec:
    """The trained codec (weights and latent_scale) of a ShapeAutoencoder checkpoint, frozen, in eval mode.

    Read from the checkpoint's hyper-parameters and ``codec.*`` weights directly, so the codec does
    not need the LightningModule that trained it."""
    state = load_checkpoint(ckpt, map_location=map_location)
    cfg = state.get("hyper_parameters", {}).get("codec")
    if isinstance(cfg, dict):
        cfg = ShapeAEConfig(**cfg)
    if not isinstance(cfg, ShapeAEConfig):
        raise ValueError(f"{ckpt}: not a ShapeAutoencoder checkpoint (no codec config in its hyper-parameters)")
    codec = ShapeCodec(cfg)
    weights = {k.removeprefix("codec."): v for k, v in state["state_dict"].items() if k.startswith("codec.")}
    codec.load_state_dict(weights)
    return codec.eval().requires_grad_(False)


class ShapeLatents(Codec):
    """First stage of ShapeFlow on pre-encoded latent shards (app/shape_latents.py).

    ``encode`` is the identity: the shards already hold scaled latents (B, K, d), what
    ``ShapeCodec.encode`` returns. ``decode`` turns generated latents into occupancy grids with the
    autoencoder of ``ckpt``. Its weights are frozen and travel in the flow's checkpoint too, so a
    flow samples with the very decoder it was trained for, and its checkpoint records the decoder's
    sizes, so the file at ``ckpt`` is only needed for training.
    """

    def __init__(self, ckpt: str | None = None, resolution: int = 32, autoencoder: dict | None = None) -> None:
        """
        Args:
            ckpt: ShapeAutoencoder checkpoint (``python -m app fit --config configs/shape/autoencoder.yaml``)
                whose encoder wrote the latent shards.
            resolution: Side R of the occupancy grid that samples are decoded on (marching cubes runs on it).
            autoencoder: The autoencoder's ShapeAEConfig as a dict, used when ``ckpt`` is gone: a flow
                checkpoint records it (ShapeFlow.on_save_checkpoint) and holds the decoder's weights, so
                ``app sample`` needs the flow's checkpoint alone.
        """
        super().__init__()
        if resolution < 2:
            raise ValueError(f"ShapeLatents: resolution={resolution}, expected at least 2 grid points per side")
        self.resolution = resolution
        # frozen: requires_grad False, so neither the optimizer nor EMA touch it (train/eval mode changes
        # nothing: the codec has no dropout or batch norm)
        if ckpt is not None and Path(ckpt).is_file():
            self.ae = load_shape_codec(ckpt)
        elif autoencoder is not None:  # weights follow from the flow checkpoint's state dict
            self.ae = ShapeCodec(ShapeAEConfig(**autoencoder)).eval().requires_grad_(False)
        else:
            raise FileNotFoundError(f"ShapeLatents: no such checkpoint {ckpt!r}; expected the ShapeAutoencoder .ckpt "
                                    "that encoded the latent shards (model.init_args.codec.init_args.ckpt)")

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(K, d) of the autoencoder's latent set."""
        return self.ae.cfg.latents, self.ae.cfg.latent_dim

    def encode(self, latents: Tensor) -> Tensor:
        return latents

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, K, d) -> occupancy probabilities (B, R, R, R), one shape at a time (a batch of
        100 at R = 32 would hold GBs of attention scores)."""
        return torch.cat([self.ae.decode(z[None], self.resolution) for z in latents])
