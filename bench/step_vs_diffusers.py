"""Training step (forward + backward + AdamW) of our MMDiT vs diffusers' SD3Transformer2DModel.

Both models take the same inputs: a latent image (B, C_in, H, W), context tokens (B, L, C),
a pooled vector (B, C) and a time per sample, and return the velocity in the latent's shape.
Ours is MMDiT(depth_dual=N, depth_single=0) with ImageFlow's patchify (ImagePatches + Linear
x_in / x_out) and, to match SD3's inputs, a context Linear and a pooled-vector MLP like SD3's
context_embedder and pooled text projection. The peer is SD3Transformer2DModel(num_layers=N)
with RMS QK-norm, built from a config with random weights.

SD3 builds its last block with context_pre_only=True (no context MLP / out proj), which leaves
it ~13 C^2 parameters and that much work short of ours. By default we rebuild that block as a
full JointTransformerBlock so both models do the same work and the parameter counts match
within 2%; --peer-stock-last keeps SD3's own last block.

CPU (default): small config, fp32. GPU: --device cuda --dtype bf16 --preset gpu (~450M params).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench_path import REPO  # noqa: F401  (puts the repo root on sys.path)
from common import (DTYPES, interleaved, library_share, median, median_ratio, mib, peak_memory, profile_top, report,
                    table)
from models.attention import resolve_backend
from models.backbone import MMDiT, MMDiTConfig
from models.tokenizers.image import ImagePatches

PRESETS = {
    "cpu": dict(dim=256, heads=4, depth=4, channels=4, size=32, patch=2, ctx=32, batch=4),
    "gpu": dict(dim=1024, heads=16, depth=12, channels=16, size=64, patch=2, ctx=154, batch=8),
}


class OursImage(nn.Module):
    """ImageFlow's patchify around MMDiT, with SD3-shaped context and pooled inputs."""

    def __init__(self, cfg: MMDiTConfig, tokenizer: ImagePatches, ctx_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.x_in = nn.Linear(tokenizer.token_dim, cfg.dim)
        self.ctx_in = nn.Linear(ctx_dim, cfg.dim)
        self.pooled_in = nn.Sequential(nn.Linear(pooled_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.backbone = MMDiT(cfg)
        self.x_out = nn.Linear(cfg.dim, tokenizer.token_dim)

    def forward(self, x: Tensor, ctx: Tensor, pooled: Tensor, t: Tensor) -> Tensor:
        tokens, pos = self.tokenizer.tokenize(x)  # (B, N, P), (B, N, 2)
        (h,) = self.backbone([self.x_in(tokens), self.ctx_in(ctx)], t, self.pooled_in(pooled), [pos, None])
        return self.tokenizer.untokenize(self.x_out(h), tuple(x.shape))


def build_peer(p: dict, stock_last: bool) -> nn.Module:
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock

    head_dim = p["dim"] // p["heads"]
    peer = SD3Transformer2DModel(
        sample_size=p["size"],
        patch_size=p["patch"],
        in_channels=p["channels"],
        num_layers=p["depth"],
        attention_head_dim=head_dim,
        num_attention_heads=p["heads"],
        joint_attention_dim=p["dim"],
        caption_projection_dim=p["dim"],
        pooled_projection_dim=p["dim"],
        out_channels=p["channels"],
        pos_embed_max_size=p["size"] // p["patch"],
        qk_norm="rms_norm",
    )
    if not stock_last:
        peer.transformer_blocks[-1] = JointTransformerBlock(
            dim=p["dim"], num_attention_heads=p["heads"], attention_head_dim=head_dim,
            context_pre_only=False, qk_norm="rms_norm",
        )
    return peer


def build_ours(p: dict, checkpointing: bool = False, compile: bool = False) -> OursImage:
    cfg = MMDiTConfig(
        dim=p["dim"], heads=p["heads"], depth_dual=p["depth"], depth_single=0,
        streams=2, out_streams=1, rope_axes=2, qk_norm=True, checkpointing=checkpointing, compile=compile,
    )
    return OursImage(cfg, ImagePatches(channels=p["channels"], size=p["size"], patch=p["patch"]), p["dim"], p["dim"])


def n_params(m: nn.Module) -> int:
    return sum(q.numel() for q in m.parameters())


def make_step(model: nn.Module, call, target: Tensor, fused: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)

    def step() -> None:
        loss = F.mse_loss(call().float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default=None, help="config; default cpu on CPU, gpu on CUDA")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peer-stock-last", action="store_true", help="keep SD3's context_pre_only last block")
    ap.add_argument("--profile", type=int, default=0, help="print the top-K ops of one step of each model")
    ap.add_argument("--compile", action="store_true", help="ours with MMDiTConfig.compile=True (per-block torch.compile)")
    ap.add_argument("--peer-compile", action="store_true", help="the peer's blocks torch.compile'd the same way")
    ap.add_argument("--trainer-optimizers", action="store_true",
                    help="each trainer's own AdamW instead of the same one: ours fused (models.training."
                         "adamw_with_warmup), the peer torch's default (as diffusers' training scripts build it)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    p = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]

    torch.manual_seed(0)
    ours = build_ours(p, compile=args.compile).to(device, dtype)
    peer = build_peer(p, args.peer_stock_last).to(device, dtype)
    if args.peer_compile:
        for block in peer.transformer_blocks:
            block.compile(dynamic=True)
    b = p["batch"]
    x = torch.randn(b, p["channels"], p["size"], p["size"], device=device, dtype=dtype)
    ctx = torch.randn(b, p["ctx"], p["dim"], device=device, dtype=dtype)
    pooled = torch.randn(b, p["dim"], device=device, dtype=dtype)
    t = torch.rand(b, device=device)
    target = torch.randn(x.shape, device=device)

    steps = {
        "ours": make_step(ours, lambda: ours(x, ctx, pooled, t.to(dtype)), target, fused=args.trainer_optimizers),
        "diffusers": make_step(peer, lambda: peer(x, ctx, pooled, (1000 * t).to(dtype), return_dict=False)[0], target),
    }
    times = interleaved(steps, args.iters, args.warmup, device)
    mem = {name: peak_memory(fn, device) for name, fn in steps.items()}  # after warm-up: AdamW state exists

    po, pp = n_params(ours), n_params(peer)
    tokens = (p["size"] // p["patch"]) ** 2
    rows = [
        ["ours (MMDiT)", po, median(times["ours"]) * 1e3, b / median(times["ours"]), mib(mem["ours"])],
        ["diffusers SD3Transformer2DModel", pp, median(times["diffusers"]) * 1e3, b / median(times["diffusers"]),
         mib(mem["diffusers"])],
    ]
    ratio = median_ratio(times["ours"], times["diffusers"])
    body = table(["model", "params", "step ms (median)", "samples/s", "peak MiB above params"], rows)
    body += (
        f"\n\nparams ours/peer = {po / pp:.4f} (|diff| {abs(po / pp - 1) * 100:.2f}%)"
        f"\n\n**median step-time ratio ours/diffusers = {ratio:.3f}** over {args.iters} interleaved rounds"
        f" (bar <= 0.9); peak-memory ratio ours/diffusers = {mem['ours'] / mem['diffusers']:.3f}"
    )
    if device.type == "cpu":
        share = {name: library_share(fn) for name, fn in steps.items()}
        floor = sum(share["ours"][1:]) / share["diffusers"][0]
        body += "\n\nprofiled (3 steps each, CPU self time): " + "; ".join(
            f"{name} {total * 1e3:.0f} ms/step: {lib / total:.1%} matmul/attention library calls, "
            f"{opt / total:.1%} AdamW step, {1 - (lib + opt) / total:.1%} the model's own code"
            for name, (total, lib, opt) in share.items())
        body += ("\n\nlowest ratio ours/diffusers any rewrite of ours could reach (its library calls and AdamW step "
                 f"alone, everything else free, vs the peer's whole step): **{floor:.3f}**")
    if args.profile:
        for name, fn in steps.items():
            body += f"\n\nprofile of one {name} step (top {args.profile} by self time):\n\n```\n{profile_top(fn, args.profile)}```"
    config = dict(
        **p, tokens=tokens, dtype=args.dtype,
        optimizer="ours AdamW(fused=True), peer AdamW()" if args.trainer_optimizers else "AdamW() both",
        ours_attention=resolve_backend(device, "auto"), peer_last_block="stock" if args.peer_stock_last else "full",
        ours_compile=args.compile, peer_compile=args.peer_compile,
        memory="torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events",
    )
    suffix = "".join(name for name, on in [("_trainers", args.trainer_optimizers), ("_stock", args.peer_stock_last),
                                           ("_compile", args.compile), ("_peercompile", args.peer_compile)] if on)
    report("step_vs_diffusers" + suffix, device, config, body)


if __name__ == "__main__":
    main()
