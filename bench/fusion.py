"""How much elementwise work a block costs: eager ops and bytes, inductor kernels. A CPU proxy for GPU time.

On a GPU the norms, modulation, RoPE and residuals are memory-bound: their cost is the number of
kernels launched and the bytes they move, not FLOPs. This script measures both for one
DualStreamBlock and one SingleStreamBlock, forward + backward:

- eager: every aten op dispatched (about one kernel launch each) and the bytes of their outputs
  (what eager writes to memory), counted with a TorchDispatchMode, so it runs on any device;
- CUDA eager without a GPU: the same forward count with fake CUDA tensors (torch then takes its
  CUDA paths, e.g. the fused rms_norm kernel that the CPU lacks) and the backward's autograd nodes
  (about one kernel each; the fake backward cannot run without a GPU);
- compiled (inductor, ``fullgraph=True, dynamic=True`` as ``MMDiTConfig.compile``): the kernels
  inductor generates for the forward and backward graphs (matmuls and attention are library
  calls, not counted) and its estimate of the bytes those kernels read and write (their inputs
  and outputs: not comparable with the eager column, which counts outputs only).

Fewer ops, bytes and kernels at equal results is what a change to the block's elementwise code
should show before it reaches a GPU. The compiled columns take ~1-2 min of inductor on a 2-core CPU.

    python bench/fusion.py                  # fp32 and bf16, dim 64
    python bench/fusion.py --eager-only     # seconds
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_path import REPO  # noqa: F401
from common import DTYPES, report, table
from models.blocks import DualStreamBlock, SingleStreamBlock
from models.packing import Layout
from models.rope import rope_cos_sin

SKIP = {"detach", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
        "select", "slice", "split", "split_with_sizes", "unbind", "as_strided", "alias", "_reshape_alias",
        "unflatten", "reshape", "chunk", "promote_types", "device"}
"""Ops that only make a view or compute a dtype (no kernel, no bytes)."""


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run a kernel and the bytes of their outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in SKIP:
            self.ops[name] += 1
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.bytes += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
        return out


def inputs(a: argparse.Namespace, dtype: torch.dtype) -> tuple:
    """One block call's arguments: an image stream with 2-D RoPE, a context stream without, c; and the
    RoPE tables of the joined sequence (the backbone makes both once per forward, not per block)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.tokens, a.dim, generator=g).to(dtype).requires_grad_()
    ctx = torch.randn(a.batch, a.ctx, a.dim, generator=g).to(dtype).requires_grad_()
    c = torch.randn(a.batch, a.dim, generator=g).to(dtype)
    side, half = int(a.tokens ** 0.5), a.dim // a.heads // 2
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(1, -1, 2)
    rope = rope_cos_sin(pos.expand(a.batch, -1, -1).float(), [half, half])
    none = (torch.ones(a.batch, a.ctx, half), torch.zeros(a.batch, a.ctx, half))
    joined = tuple(torch.cat([r, n], dim=1) for r, n in zip(rope, none))
    return x, ctx, c, rope, joined


def build(kind: str, dim: int, heads: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    block = DualStreamBlock(dim, heads, n_streams=2, attn_backend="sdpa") if kind == "dual" else \
        SingleStreamBlock(dim, heads, attn_backend="sdpa")
    with torch.no_grad():  # non-zero adaLN, else the block is the identity and its backward trivial
        for name, p in block.named_parameters():
            if ".mod." in f".{name}":
                p.normal_(std=0.2)
    return block.to(dtype)


def step(block: torch.nn.Module, kind: str, args: tuple) -> None:
    """Forward and backward of one block (the loss's own ops are counted too: a constant offset)."""
    x, ctx, c, rope, joined = args
    if kind == "dual":
        outs = block([x, ctx], c, [rope, None], Layout())
    else:
        outs = [block(torch.cat([x, ctx], dim=1), c, joined, Layout())]
    sum(o.float().square().mean() for o in outs).backward()


def eager_counts(kind: str, a: argparse.Namespace, dtype: torch.dtype) -> tuple[int, float, Counter]:
    block, args = build(kind, a.dim, a.heads, dtype), inputs(a, dtype)
    counter = OpCounter()
    with counter:
        step(block, kind, args)
    return sum(counter.ops.values()), counter.bytes / 2**20, counter.ops


def cuda_eager_counts(kind: str, a: argparse.Namespace, dtype: torch.dtype) -> tuple[int, float, int]:
    """Forward ops and MiB written with fake CUDA tensors, and the backward's autograd nodes (views left out)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    block, args = build(kind, a.dim, a.heads, dtype), inputs(a, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        block = block.to("cuda")
        x, ctx, c, rope, joined = (tuple(t.to("cuda") for t in v) if isinstance(v, tuple)
                                   else v.to("cuda").detach().requires_grad_(v.requires_grad) for v in args)
        counter = OpCounter()
        with counter:
            outs = (block([x, ctx], c, [rope, None], Layout()) if kind == "dual"
                    else [block(torch.cat([x, ctx], dim=1), c, joined, Layout())])
            loss = sum(o.float().square().mean() for o in outs)
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [f for f, _ in node.next_functions]
    views = ("AccumulateGrad", "View", "Squeeze", "Transpose", "Permute", "Split", "Unbind", "Expand", "Select",
             "TBackward", "Reshape", "Unflatten")
    nodes = [n for n in seen if not any(v in type(n).__name__ for v in views)]
    return sum(counter.ops.values()), counter.bytes / 2**20, len(nodes)


def compiled_counts(kind: str, a: argparse.Namespace, dtype: torch.dtype) -> tuple[int, float]:
    """Kernels inductor generates for one block's forward and backward graphs, and its estimate of the
    bytes they read and write."""
    from torch._inductor import config, metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    config.fx_graph_cache = False  # a cache hit generates no code, and nothing would be counted
    metrics.reset()
    torch._logging.set_logs(inductor_metrics=True)  # makes inductor count the bytes its kernels move ...
    handlers = [h for name, lg in logging.Logger.manager.loggerDict.items()
                if name.startswith("torch") and isinstance(lg, logging.Logger) for h in lg.handlers]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.WARNING)  # ... without printing them
    block = build(kind, a.dim, a.heads, dtype)
    block.compile(dynamic=True, fullgraph=True)
    try:
        _, code = run_and_get_code(step, block, kind, inputs(a, dtype))
    finally:
        torch._logging.set_logs()
        for h, level in zip(handlers, levels):
            h.setLevel(level)
    kernels = sum(src.count("async_compile.cpp_pybinding(") + src.count("async_compile.triton(") for src in code)
    return kernels, metrics.num_bytes_accessed / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="image tokens per sample (a square number)")
    ap.add_argument("--ctx", type=int, default=16, help="context tokens per sample")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--eager-only", action="store_true", help="skip the inductor columns")
    ap.add_argument("--ops", action="store_true", help="list the eager ops of each row")
    a = ap.parse_args()
    rows, detail = [], []
    for name in a.dtypes:
        for kind in ("dual", "single"):
            n_ops, mb, ops = eager_counts(kind, a, DTYPES[name])
            cuda_fwd, cuda_mb, cuda_bwd = cuda_eager_counts(kind, a, DTYPES[name])
            kernels, kmb = ("-", "-") if a.eager_only else compiled_counts(kind, a, DTYPES[name])
            rows.append([kind, name, n_ops, mb, cuda_fwd, cuda_mb, cuda_bwd, kernels, kmb])
            detail.append(f"{kind} {name}: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    body = table(["block", "dtype", "CPU eager aten ops (fwd+bwd)", "CPU eager MiB written",
                  "CUDA eager (fake) fwd ops", "CUDA eager (fake) fwd MiB written", "CUDA backward autograd nodes",
                  "inductor kernels (fwd+bwd)", "inductor MiB moved (estimate)"], rows)
    if a.ops:
        body += "\n\n" + "\n\n".join(detail)
    config = dict(dim=a.dim, heads=a.heads, batch=a.batch, tokens=a.tokens, ctx=a.ctx, attention="sdpa",
                  compile="fullgraph=True, dynamic=True")
    report("fusion", torch.device("cpu"), config, body)


if __name__ == "__main__":
    main()
