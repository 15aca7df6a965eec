"""Packed (block-diagonal) vs padded batches of mixed-length images through the MMDiT.

One batch of S images whose token counts spread from 64 to 1024 (sides 8..32 patches), each
with a short context stream. Packed: Layout.packed, every sample's tokens end to end, attention
block-diagonal over the joined [x, ctx] tokens of each sample. Padded: a regular batch, x
zero-padded to the longest sample. Our regular path has no key-padding mask, so padded
tokens take part in attention: that is exactly the work a padded trainer pays (a masked one
pays the same matmuls plus the mask). The loss only counts real tokens in both.
Reported: forward + backward time and useful (real image) tokens per second.

    python bench/packing.py
    python bench/packing.py --device cuda --dtype bf16 --dim 1024 --heads 16 --depth-dual 8 --depth-single 8 --samples 32
"""

from __future__ import annotations

import random

import torch

from bench_path import REPO  # noqa: F401
from common import DTYPES, interleaved, median, median_ratio, report, table, parser, backbone_from_args
from models.attention import resolve_backend
from models.backbone import MMDiT
from models.packing import Layout


def grid(side: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([r, c], -1).reshape(-1, 2).float()  # (side^2, 2)


def batches(model: MMDiT, sides: list[int], ctx_len: int, device, dtype):
    """(packed step, padded step) closures doing forward + backward on the same samples."""
    dim, s = model.cfg.dim, len(sides)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n * n, dim, generator=g) for n in sides]  # per-sample image tokens
    ctx = torch.randn(s, ctx_len, dim, generator=g)
    t, y = torch.rand(s, generator=g), torch.randn(s, dim, generator=g)
    lens = [n * n for n in sides]
    to = dict(device=device, dtype=dtype)

    # packed: (1, sum N_i, C)
    layout = Layout.packed([lens, [ctx_len] * s])
    x_p = torch.cat(xs)[None].to(**to).requires_grad_()
    ctx_p = ctx.reshape(1, s * ctx_len, dim).to(**to)
    pos_p = torch.cat([grid(n) for n in sides])[None].to(device)

    # padded: (S, max N, C) zeros beyond each sample's length
    n_max = max(lens)
    x_r = torch.zeros(s, n_max, dim)
    pos_r = torch.zeros(s, n_max, 2)
    valid = torch.zeros(s, n_max, 1, dtype=torch.bool)
    for i, (n, xi) in enumerate(zip(sides, xs)):
        x_r[i, : n * n], pos_r[i, : n * n], valid[i, : n * n] = xi, grid(n), True
    x_r, pos_r, valid = x_r.to(**to).requires_grad_(), pos_r.to(device), valid.to(device)
    ctx_r = ctx.to(**to)
    t, y = t.to(device), y.to(**to)

    def packed() -> None:
        (h,) = model([x_p, ctx_p], t, y, [pos_p, None], layout)
        h.float().square().mean().backward()

    def padded() -> None:
        (h,) = model([x_r, ctx_r], t, y, [pos_r, None])
        (h.float().square() * valid).sum().div(valid.sum() * dim).backward()

    return packed, padded


def main() -> None:
    ap = parser(__doc__, dim=128, depth_dual=2, depth_single=1)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--min-side", type=int, default=8, help="smallest image side in patches (8 -> 64 tokens)")
    ap.add_argument("--max-side", type=int, default=32, help="largest image side in patches (32 -> 1024 tokens)")
    ap.add_argument("--ctx", type=int, default=16, help="context tokens per sample")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    model = backbone_from_args(args, device, dtype)
    rng = random.Random(0)
    spread = sorted([args.min_side, args.max_side] + [rng.randint(args.min_side, args.max_side)
                                                       for _ in range(args.samples - 2)])
    spreads = {"spread": spread, "uniform (no padding)": [args.max_side // 2] * args.samples}

    rows = []
    for label, sides in spreads.items():
        packed, padded = batches(model, sides, args.ctx, device, dtype)
        times = interleaved({"packed": packed, "padded": padded}, args.iters, args.warmup, device)
        useful = sum(n * n for n in sides)
        padded_tokens = len(sides) * max(sides) ** 2
        for name in ("packed", "padded"):
            rows.append([label, name, median(times[name]) * 1e3, useful / median(times[name]),
                         useful / padded_tokens if name == "padded" else 1.0])
        ratio = median_ratio(times["padded"], times["packed"])
        rows.append([label, "**packed speed-up (padded/packed time)**", f"**{ratio:.2f}x**", "", ""])
    body = table(["batch", "path", "fwd+bwd ms (median)", "useful tokens/s", "useful fraction"], rows)
    body += "\n\nimage tokens per sample (spread): " + ", ".join(str(n * n) for n in spread)
    config = dict(dim=args.dim, heads=args.heads, depth_dual=args.depth_dual, depth_single=args.depth_single,
                  samples=args.samples, ctx_tokens=args.ctx, dtype=args.dtype,
                  attention=resolve_backend(device, "auto"), rounds=args.iters)
    report("packing", device, config, body)


if __name__ == "__main__":
    main()
