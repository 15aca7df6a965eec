"""Attention backends on the same shapes: forward + backward time of models.attention's kernels.

CPU: torch SDPA (our "sdpa" backend) vs our eager "math" reference.
CUDA: xformers, SDPA restricted to each kernel via torch.nn.attention.sdpa_kernel (flash,
efficient, cudnn, math) and our eager "math". One packed shape (block-diagonal, mixed
lengths) shows the packed paths: xformers BlockDiagonalMask, torch's varlen flash (CUDA) or our
SDPA loop over segments (CPU), and the dense masked "math". Each kernel is chosen once
(`select_kernel`), as a block does, so the timings hold no backend resolution.

    python bench/attention_backends.py                          # CPU
    python bench/attention_backends.py --device cuda --dtype bf16 --heads 16 --tokens 1024 4096 --batch 4
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from bench_path import REPO  # noqa: F401
from common import DTYPES, interleaved, median, median_ratio, report, table, parser
from models.attention import select_kernel
from models.packing import Layout


def candidates(device: torch.device) -> dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]]:
    """name -> (our backend, factory of a context manager restricting SDPA to one kernel)."""
    null = contextlib.nullcontext
    if device.type != "cuda":
        return {"sdpa": ("sdpa", null), "math (ours, eager)": ("math", null)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def only(b: SDPBackend):
        return lambda: sdpa_kernel([b])

    return {
        "sdpa (auto)": ("sdpa", null),
        "xformers": ("xformers", null),
        "sdpa flash": ("sdpa", only(SDPBackend.FLASH_ATTENTION)),
        "sdpa efficient": ("sdpa", only(SDPBackend.EFFICIENT_ATTENTION)),
        "sdpa cudnn": ("sdpa", only(SDPBackend.CUDNN_ATTENTION)),
        "sdpa math": ("sdpa", only(SDPBackend.MATH)),
        "math (ours, eager)": ("math", null),
    }


def fwd_bwd(q, k, v, backend: str, ctx, layout: Layout | None) -> Callable[[], None]:
    kernel = select_kernel(backend)

    def run() -> None:
        with ctx():
            out = kernel(q, k, v, layout)
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None

    return run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--packed", type=int, nargs="*", default=[64, 144, 256, 576, 1024],
                    help="lengths of one packed batch (block-diagonal); empty to skip")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cands = candidates(device)
    ref = "sdpa (auto)" if device.type == "cuda" else "sdpa"  # ratios against torch's default, always there

    shapes = [(f"dense B={args.batch} N={n}", args.batch, n, None) for n in args.tokens]
    if args.packed:
        shapes.append((f"packed {args.packed}", 1, sum(args.packed), args.packed))
    rows = []
    for label, b, n, seqlens in shapes:
        layout = None if seqlens is None else Layout.packed([seqlens]).to(device)
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(b, n, args.heads, args.head_dim, generator=g).to(device, dtype).requires_grad_()
            for _ in range(3)
        )
        fns, skipped = {}, {}
        for name, (backend, ctx) in cands.items():
            fn = fwd_bwd(q, k, v, backend, ctx, layout)
            try:
                fn()
                fns[name] = fn
            except Exception as e:  # a kernel that does not support this shape/dtype/GPU
                skipped[name] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
        with torch.no_grad():  # correctness: every contender against our float32 math reference
            want = select_kernel("math")(q, k, v, layout).float()
            errs = {}
            for name, (backend, ctx) in cands.items():
                if name in fns:
                    with ctx():
                        errs[name] = (select_kernel(backend)(q, k, v, layout).float() - want).abs().max().item()
        times = interleaved(fns, args.iters, args.warmup, device)
        for name in cands:
            if name in skipped:
                rows.append([label, name, skipped[name], "", "", ""])
                continue
            r = median_ratio(times[name], times[ref]) if ref in times else float("nan")
            rows.append([label, name, median(times[name]) * 1e3, r, f"{errs[name]:.1e}", len(times[name])])
    body = table(["shape", "backend", "fwd+bwd ms (median)", f"ratio to {ref}", "max abs err vs math", "rounds"], rows)
    config = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
                  layout="(B, N, H, D) through models.attention.select_kernel")
    report("attention_backends", device, config, body)


if __name__ == "__main__":
    main()
