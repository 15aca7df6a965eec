"""Does xformers really run here? One forward + backward per fMHA operator (cutlass, flash, flash3),
dense and packed (BlockDiagonalMask), each checked against float32 math, with the error of every
operator that cannot run. What the product promises is measured, not assumed.

    python bench/xformers_ops.py --device cuda --dtype bf16
"""

from __future__ import annotations

import math

import torch

from bench_path import REPO  # noqa: F401
from common import DTYPES, interleaved, median, parser, report, table
from models.attention import attention
from models.packing import Layout

OPS = ("cutlass", "flash", "flash3")


def math_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    return attention(q.float(), k.float(), v.float(), layout, backend="math")


def main() -> None:
    ap = parser(__doc__, heads=16)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    try:
        import xformers
        import xformers.ops as xops
    except Exception as e:  # the point is to record why
        rows.append(["(import)", "-", "no", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "-", "-"])
        report("xformers_ops", device, dict(dtype=args.dtype), table(["op", "shape", "runs", "error", "max |err|", "ms"], rows))
        return
    g = torch.Generator(device="cpu").manual_seed(0)
    seqlens = [args.tokens // 4, args.tokens // 2, args.tokens // 4]
    shapes = {"dense (2, N)": (2, args.tokens, None), "packed 3 samples": (1, args.tokens, seqlens)}
    for op in OPS:
        module = getattr(xops.fmha, op, None)
        for shape_name, (b, n, lens) in shapes.items():
            q, k, v = (torch.randn(b, n, args.heads, args.head_dim, generator=g).to(device, dtype).requires_grad_()
                       for _ in range(3))
            layout = Layout.packed([lens]) if lens else None
            bias = xops.fmha.BlockDiagonalMask.from_seqlens(lens, device=device) if lens else None
            try:
                if module is None:
                    raise ImportError(f"xformers.ops.fmha has no {op} module in xformers {xformers.__version__}")
                fw_bw = (module.FwOp, module.BwOp)
                out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, op=fw_bw)
                out.float().square().mean().backward()
                ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
                ref = math_reference(ref_q, ref_k, ref_v, layout)
                ref.square().mean().backward()
                err = max((out.float() - ref).abs().max().item(),
                          *((a.grad.float() - r.grad).abs().max().item() / max(r.grad.abs().max().item(), 1e-12)
                            for a, r in ((q, ref_q), (k, ref_k), (v, ref_v))))
                def fwd_bwd() -> None:
                    xops.memory_efficient_attention(q, k, v, attn_bias=bias, op=fw_bw).sum().backward()

                times = interleaved({op: fwd_bwd}, args.iters, 1, device)[op]
                rows.append([op, shape_name, "yes", "", f"{err:.2e}", median(times) * 1e3])
            except Exception as e:
                text = " ".join(str(e).split())
                why = text if len(text) < 260 else f"{text[:100]} ... {text[-150:]}"  # the reasons come last
                rows.append([op, shape_name, "no", f"{type(e).__name__}: {why}", "-", "-"])
    body = table(["op", "shape", "runs", "error", "max |err| (out, rel. grads) vs fp32 math", "fwd+bwd ms"], rows)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    runs = [r for r in rows if r[2] == "yes"]
    body += (f"\n\n{len(runs)} of {len(rows)} operator/shape pairs ran; every one that ran is "
             f"{'within' if all(float(r[4]) < tol for r in runs) else 'NOT within'} {tol:g} of float32 math.")
    report("xformers_ops", device, dict(dtype=args.dtype, heads=args.heads, head_dim=args.head_dim, tokens=args.tokens,
                                         xformers=xformers.__version__, softmax_scale=1 / math.sqrt(args.head_dim)), body)


if __name__ == "__main__":
    main()
