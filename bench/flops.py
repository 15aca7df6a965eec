"""MMDiT.flops_per_token (analytic) vs torch.utils.flop_counter.FlopCounterMode, and achieved FLOP/s / MFU.

The analytic count covers the per-token matmuls (qkv, out proj, MLP, QK^T and AV); the counter
also sees the per-sample modulation Linears and the timestep MLP, so it should come out a little
higher. Training is taken as 3x the forward (the counter measures the backward too).
FlopCounterMode has no formula for torch's CPU flash-attention kernel (nor for xformers), so the
counting passes run a copy of the model with attn_backend="math" on CPU and "sdpa" on CUDA (same
weights).

    python bench/flops.py
    python bench/flops.py --device cuda --dtype bf16 --dim 1024 --heads 16 --depth-dual 12 --depth-single 12 \
        --tokens 1024 --batch 8 --peak-tflops 989     # H100 SXM dense bf16
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_path import REPO  # noqa: F401
from common import DTYPES, interleaved, median, profile_top, report, table, parser, backbone_from_args
from models.backbone import MMDiT


def main() -> None:
    ap = parser(__doc__, dim=256, depth_dual=2, depth_single=2)
    ap.add_argument("--tokens", type=int, default=256, help="image tokens per sample")
    ap.add_argument("--ctx", type=int, default=32, help="context tokens per sample")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU (0: not reported)")
    ap.add_argument("--profile", type=int, default=0, help="print the top-K ops of one step")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    model = backbone_from_args(args, device, dtype)
    b, n, l = args.batch, args.tokens, args.ctx
    x = torch.randn(b, n, args.dim, device=device, dtype=dtype, requires_grad=True)
    ctx = torch.randn(b, l, args.dim, device=device, dtype=dtype)
    pos = torch.randint(0, 32, (b, n, 2), device=device).float()
    t, y = torch.rand(b, device=device), torch.randn(b, args.dim, device=device, dtype=dtype)

    # CUDA: SDPA's flash / efficient kernels have FLOP formulas; CPU's flash kernel has none, so count with math
    count_backend = "sdpa" if device.type == "cuda" else "math"
    counting = MMDiT(dataclasses.replace(model.cfg, attn_backend=count_backend)).to(device, dtype)
    counting.load_state_dict(model.state_dict())

    def forward(m: MMDiT = model) -> torch.Tensor:
        return m([x, ctx], t, y, [pos, None])[0]

    # the analytic count is over all joined tokens: image and context streams both go through every block
    seq = n + l
    analytic_fwd = model.flops_per_token(seq) * seq * b
    with FlopCounterMode(display=False) as fc_fwd:
        out = forward(counting)
    counted_fwd = fc_fwd.get_total_flops()
    with FlopCounterMode(display=False) as fc_train:
        forward(counting).float().square().mean().backward()
    counted_train = fc_train.get_total_flops()
    del out

    def step() -> None:
        forward().float().square().mean().backward()

    step_s = median(interleaved({"step": step}, args.iters, 1, device)["step"])
    achieved = 3 * analytic_fwd / step_s
    rows = [
        ["forward", analytic_fwd / 1e9, counted_fwd / 1e9, f"{counted_fwd / analytic_fwd:.4f}"],
        ["forward + backward (analytic = 3x forward)", 3 * analytic_fwd / 1e9, counted_train / 1e9,
         f"{counted_train / (3 * analytic_fwd):.4f}"],
    ]
    body = table(["pass", "analytic GFLOP", "FlopCounterMode GFLOP", "counted / analytic"], rows)
    body += f"\n\nfwd+bwd step {step_s * 1e3:.1f} ms -> {achieved / 1e12:.4f} TFLOP/s achieved (analytic 3x forward)"
    if args.peak_tflops > 0:
        body += f"; MFU = {achieved / 1e12 / args.peak_tflops:.3f} of {args.peak_tflops} TFLOP/s peak"
    elif device.type != "cuda":
        body += "; GPU MFU: no GPU in this session (run the CUDA command in the docstring there)"
    if args.profile:
        body += f"\n\nprofile of one step (top {args.profile} by self time):\n\n```\n{profile_top(step, args.profile)}```"
    config = dict(dim=args.dim, heads=args.heads, depth_dual=args.depth_dual, depth_single=args.depth_single,
                  image_tokens=n, ctx_tokens=l, batch=b, dtype=args.dtype, params=model.num_params(),
                  compile=args.compile)
    report("flops" + ("_compile" if args.compile else ""), device, config, body)


if __name__ == "__main__":
    main()
