"""The shared flow-matching LightningModule of every generator (models/generators.py has the thin ones).

Letters: B batch, N tokens, P values per token, D model width, L context tokens.

`FlowMatchingModule` owns everything every modality shares: the backbone, the condition
encoder, the training step (rectified flow, t=0 data / t=1 noise, see models/flow.py) on
regular or packed token batches, the non-finite step guard, the optimizer and LR warm-up, and
sampling with classifier-free guidance. A modality is a tokenizer, a codec and a media writer
on top.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from datamodules.media.spec import MediaSpec, agree, by_autoencoder_name
from models import flow
from models.backbone import MMDiT, MMDiTConfig
from models.codecs.base import Codec
from models.codecs.identity import Identity
from models.conditioning import Condition, Unconditional
from models.packing import Layout
from models.tokenizers.base import Tokenizer
from models.tokens import Latents, Tokens, as_packed, map_latents, per_sample_mse, tokenize, untokenize
from models.training import OptimConfig, RunState, adamw_with_warmup, guarded_step, host_generator


class FlowMatchingModule(RunState, L.LightningModule):
    """Rectified-flow training and sampling for generated streams plus a context stream.

    A generated stream is a batch key ("x"), a tokenizer and a codec; ImageFlow, VideoFlow, AudioFlow
    and ShapeFlow have one, AudioVideoFlow two. Batches may hold same-sized samples (a tensor) or
    samples of different sizes (a list): those are packed end to end with block-diagonal attention
    (see models/tokens.py), never padded or cropped.
    """

    media_suffix: ClassVar[str] = ".pt"
    num_generated: ClassVar[int] = 1
    """Generated streams; the backbone has one more (the context)."""
    fps: int | None = None
    """Frame rate of the media (video generators set it)."""
    sample_rate: int | None = None
    """Audio rate of the generated media (audio generators), for writers and the tracker's audio panel."""
    codec_hparams: ClassVar[tuple[str, ...]] = ("codec",)
    """The constructor argument of each generated stream's codec (its config is in the hyper-parameters)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        backbone: MMDiTConfig = MMDiTConfig(),
        conditioning: Condition = Unconditional(),
        codec: Codec | None = None,
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
            backbone: The MM-DiT; its `streams` (generated + the context), `out_streams` (generated) and
                `rope_axes` (the tokenizer's) are derived here: leave them out.
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
        self.backbone_cfg = backbone.derive(type(self).__name__, self.num_generated, tokenizer.rope_axes)
        self.timesteps = timesteps
        self.sampler = sampler
        self.shift = shift
        self.cond_drop = cond_drop
        self.cfg_scale = cfg_scale
        self.optim = optim
        self.cond = conditioning.build(self.backbone_cfg.dim)
        self.backbone = MMDiT(self.backbone_cfg)
        self.keys: list[str] = []
        self.tokenizer_keys: list[str] = []
        """Config key of each stream's tokenizer (for the media spec's error messages)."""
        self.tokenizers: list[Tokenizer] = []
        self.codecs = nn.ModuleList()
        self.x_in = nn.ModuleList()
        self.x_out = nn.ModuleList()
        self.add_stream("x", tokenizer, codec)
        self.init_run_state()

    def add_stream(self, key: str, tokenizer: Tokenizer, codec: Codec | None = None,
                   config_key: str = "model.tokenizer") -> None:
        """A generated stream: batch[key] -> codec.encode -> tokenizer -> its own in/out projections.

        A tokenizer's ``channels`` follow the codec's latent channels (3 for pixels)."""
        source = "3 (pixels: no codec)" if codec is None else f"the codec's latent channels ({config_key.replace('tokenizer', 'codec')})"
        codec = codec if codec is not None else Identity()
        if hasattr(tokenizer, "channels") and codec.latent_channels is not None:
            tokenizer = replace(tokenizer, channels=agree(f"{config_key}.channels", tokenizer.channels,
                                                          codec.latent_channels, source))
        self.keys.append(key)
        self.tokenizer_keys.append(config_key)
        self.tokenizers.append(tokenizer)
        self.codecs.append(codec)
        self.x_in.append(nn.Linear(tokenizer.token_dim, self.backbone_cfg.dim))
        out = nn.Linear(self.backbone_cfg.dim, tokenizer.token_dim)
        nn.init.zeros_(out.weight)  # the model predicts v = 0 at init, like adaLN-Zero blocks
        nn.init.zeros_(out.bias)
        self.x_out.append(out)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.tokenizers[0]

    @property
    def codec(self) -> Codec:
        return self.codecs[0]

    def media_spec(self) -> MediaSpec:
        """What this generator's media look like (sides, multiples, frames, rates) and what a token spans.

        The data transform follows it (ShardDataModule.setup, the evaluators), so a config states
        these values once, in the model; each stream's tokenizer and codec give their part."""
        fields: dict[str, Any] = {"fps": self.fps, "sample_rate": self.sample_rate}
        sources = {"fps": "model.fps", "sample_rate": "model.sample_rate"}
        for tok, codec, key in zip(self.tokenizers, self.codecs, self.tokenizer_keys):
            part = tok.media(codec, key)
            sources.update(part.pop("sources", {}))
            fields.update(part)
        fingerprints = {key: codec.fingerprint for key, codec in zip(self.keys, self.codecs) if codec.fingerprint}
        made_with: dict[str, Any] = by_autoencoder_name(fingerprints)
        if self.cond.fingerprints:
            made_with["text_encoders"] = list(self.cond.fingerprints)
        return MediaSpec(**fields, made_with=made_with, sources=sources)

    # ---- the model -------------------------------------------------------------------

    def velocity_tokens(self, xs: list[Tokens], t: Tensor, cond: dict[str, Any], drop: Tensor) -> list[Tensor]:
        """Predicted velocity of every generated stream, as tokens in each stream's layout.

        A context of captions with their own lengths (a list) packs the whole batch: each sample
        attends to its own caption tokens only, never to padding."""
        ctx, pooled = self.cond(cond, drop)  # (S, L, D) or S x (L_b, D); (S, D)
        s = pooled.shape[0]
        if isinstance(ctx, list) and len({c.shape[0] for c in ctx}) == 1:
            ctx = torch.stack(ctx)  # every caption the same length: a regular batch
        ctx_lengths = [c.shape[0] for c in ctx] if isinstance(ctx, list) else [ctx.shape[1]] * s
        given = xs
        if isinstance(ctx, list) or any(x.layout.is_packed for x in xs):
            xs = [as_packed(x) for x in xs]
            layout = Layout.packed([x.token_counts() for x in xs] + [ctx_lengths])
            ctx = torch.cat(list(ctx))[None] if isinstance(ctx, list) else ctx.reshape(1, -1, ctx.shape[-1])  # (1, sum L, D)
        else:
            layout = None
        if self.training:
            self.last_lengths = [sum(n) + c for *n, c in zip(*(x.token_counts() for x in xs), ctx_lengths)]
        streams = [proj(x.x) for proj, x in zip(self.x_in, xs)] + [ctx]
        hs = self.backbone(streams, t, pooled, [x.pos for x in xs] + [None], layout)
        return [proj(h).reshape(x.x.shape[:2] + (-1,)) for proj, h, x in zip(self.x_out, hs, given)]  # as given

    def latents(self, batch: dict[str, Any]) -> list[Latents]:
        """The first stage of every generated stream, trimmed to whole patches (no gradient: codecs are fixed).

        A stream's latents come cached when the batch has ``<key>_latent`` (latent shards written by
        ``duoflow shards encode``: the autoencoder's own latents, normalised here with the codec's
        statistics), else the codec encodes ``batch[key]``."""
        out = []
        with torch.no_grad():
            for key, codec, tok in zip(self.keys, self.codecs, self.tokenizers):
                cached = batch.get(f"{key}_latent")
                if cached is None:
                    out.append(map_latents(lambda x, codec=codec, tok=tok: tok.crop(codec.encode(x)), batch[key]))
                    continue
                out.append(map_latents(lambda z, codec=codec, tok=tok: tok.crop(codec.normalise(z)), cached))
        return out

    def num_samples(self, batch: dict[str, Any]) -> int:
        """Samples in a batch (media or cached latents)."""
        key = self.keys[0]
        return len(batch[key] if key in batch else batch[f"{key}_latent"])

    def tokens(self, batch: dict[str, Any]) -> list[Tokens]:
        return [tokenize(tok, z) for tok, z in zip(self.tokenizers, self.latents(batch))]

    @staticmethod
    def conditions(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("cls", "txt", "txt_tokens", "txt_pooled") if k in batch}

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None, dropout: bool = True) -> Tensor:
        """Mean over samples of the squared velocity error, summed over generated streams.

        t and noise are drawn from `generator` on its device (None: the global RNG), the condition-dropout
        mask (with `dropout`) on the host from the same seed: conditions read it there without a device
        sync. Training passes `noise_generator()`, validation a fixed CPU seed and no dropout."""
        xs = self.tokens(batch)
        s, device = xs[0].num_samples, xs[0].x.device
        on = generator.device if generator is not None else device
        t = flow.shift_t(self.timesteps(s, generator=generator, device=on).to(device), self.shift)
        eps = [torch.randn(x.x.shape, generator=generator, device=on).to(x.x) for x in xs]
        if dropout:
            drop = flow.drop_mask(s, self.cond_drop, generator=host_generator(generator))  # on the host
        else:
            drop = torch.zeros(s, dtype=torch.bool)
        x_t = [x.with_x(flow.interpolate(x.x, e, x.per_token(t))) for x, e in zip(xs, eps)]
        vs = self.velocity_tokens(x_t, t, self.conditions(batch), drop)
        per_sample = sum(
            per_sample_mse(v, flow.velocity_target(x.x, e), x.layout) for v, x, e in zip(vs, xs, eps)
        )
        return per_sample.mean()

    # ---- training ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Pretrained models are not stored: their folders are (in the config), with the fingerprint
        of each, so sample/evaluate stop with one line if a folder went missing or changed. The
        latent statistics travel as the codec's buffers, so the stats file is not needed again."""
        super().on_save_checkpoint(checkpoint)
        hparams = checkpoint.get("hyper_parameters", {})
        for name, codec in zip(self.codec_hparams, self.codecs):
            init = (hparams.get(name) or {}).get("init_args") if isinstance(hparams.get(name), dict) else None
            if isinstance(init, dict) and codec.fingerprint:
                init["fingerprint"], init["stats"] = codec.fingerprint, None
        cond = hparams.get("conditioning")
        encoders = cond.get("init_args", {}).get("encoders") if isinstance(cond, dict) else None
        if isinstance(encoders, list) and self.cond.fingerprints:
            for spec, fingerprint in zip(encoders, self.cond.fingerprints):
                if isinstance(spec, dict):
                    spec["fingerprint"] = fingerprint


    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Conditions are checked here, on the host, before the batch moves: read on the device in the
        step, a class label would stall the GPU at every step (the datamodule has no such hook)."""
        if isinstance(batch, dict):
            self.cond.check(self.conditions(batch))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(self, self.optim)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch, self.noise_generator())
        guarded_step(self, loss, batch_size=self.num_samples(batch))
        return loss.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(batch_idx)  # same t and noise every validation
        loss = self.loss(batch, gen, dropout=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=self.num_samples(batch), sync_dist=True)
        return loss

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
        shapes: list[tuple[int, ...]] | None = None,
    ) -> Any:
        """Sample `num` latents from noise with the ODE sampler and decode them to media tensors.

        shapes: latent shape per generated stream (e.g. more frames); default each tokenizer's
        `latent_shape()`. Returns the decoded media (a tuple of them with several streams)."""
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        sampler = self.sampler if steps is None else replace(self.sampler, steps=steps)
        shapes = shapes or [tok.latent_shape() for tok in self.tokenizers]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = [torch.randn((num, *shape), generator=gen).to(self.device) for shape in shapes]
        xs = [tokenize(tok, z) for tok, z in zip(self.tokenizers, noise)]
        sizes = [x.x[0].numel() for x in xs]

        def unflat(x: Tensor) -> list[Tokens]:  # (b, V) -> the streams' tokens, b = num or 2 num
            b = x.shape[0]
            return [
                Tokens(part.reshape(b, *ref.x.shape[1:]), None if ref.pos is None else ref.pos[:1].expand(b, -1, -1),
                       Layout(), ref.shapes[:1] * b)
                for part, ref in zip(x.split(sizes, dim=1), xs)
            ]

        def flat(vs: list[Tensor]) -> Tensor:
            return torch.cat([v.flatten(1) for v in vs], dim=1)

        keep = torch.zeros(num, dtype=torch.bool)  # drop masks live on the host (ConditionModule)
        cond = self.cond.prepare(cond)  # e.g. captions encoded once, not at every ODE step
        both = {k: (list(v) * 2 if isinstance(v, (list, tuple)) else torch.cat([v, v])) for k, v in cond.items()}
        both_drop = torch.cat([keep, ~keep])

        def v_fn(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(self.device).expand(x.shape[0])
            if scale == 1.0:
                return flat(self.velocity_tokens(unflat(x), t, cond, keep))
            v = flat(self.velocity_tokens(unflat(torch.cat([x, x])), torch.cat([t, t]), both, both_drop))
            v_cond, v_uncond = v.chunk(2)
            return flow.cfg_velocity(v_cond, v_uncond, scale)

        x_0 = sampler(v_fn, flat([x.x for x in xs]), shift=self.shift, progress=progress)
        media = [
            codec.decode(untokenize(tok, x.with_x(part.reshape(x.x.shape))))
            for codec, tok, x, part in zip(self.codecs, self.tokenizers, xs, x_0.split(sizes, dim=1))
        ]
        return media[0] if len(media) == 1 else tuple(media)

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        """Write generated media to files; returns their paths (a preview last, when there is one)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{prefix}{self.media_suffix}"
        torch.save(x.cpu(), path)
        return [path]
