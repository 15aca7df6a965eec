"""torch.compile per block under variable token counts, and activation checkpointing on/off.

Part 1 compiles each MMDiT block itself (model.dual[i] = torch.compile(block, ...)) with a
graph-counting backend. Part 1 runs forward + backward at 3 image token
counts and counts dynamo graph compilations (a counting backend wrapped around --backend) for
dynamic=True vs the default (dynamic=None: static first, then automatic dynamic shapes), for a
regular batch and for packed batches (3 different length mixes). Recompile counts are decided
by dynamo's guards, not by the backend, so the CPU default is the quick "aot_eager";
--backend inductor measures the real thing.
Part 2: MMDiTConfig.checkpointing off/on, training step (forward + backward + AdamW) time,
interleaved, and peak memory (CPU: torch.profiler memory events; CUDA: max_memory_allocated).

    python bench/compile_memory.py
    python bench/compile_memory.py --device cuda --dtype bf16 --backend inductor --dim 1024 --heads 16 --depth 8 --batch 8 --tokens 1024 --compile-step
Part 3 (--compile-step) times MMDiTConfig.compile=True (the config switch) against eager.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch._dynamo

from bench_path import REPO  # noqa: F401
from common import DTYPES, interleaved, median, median_ratio, mib, peak_memory, report, table
from models.backbone import MMDiT, MMDiTConfig
from models.packing import Layout


class CountingBackend:
    def __init__(self, backend: str) -> None:
        self.inner, self.graphs = torch._dynamo.lookup_backend(backend), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def inputs(cfg: MMDiTConfig, lens: list[int], ctx: int, packed: bool, device, dtype):
    """(xs, t, y, pos, layout) for images of `lens` tokens (regular batch: all lens equal)."""
    s, dim = len(lens), cfg.dim
    t, y = torch.rand(s, device=device), torch.randn(s, dim, device=device, dtype=dtype)
    if packed:
        layout = Layout.packed([lens, [ctx] * s])
        x = torch.randn(1, sum(lens), dim, device=device, dtype=dtype, requires_grad=True)
        c = torch.randn(1, s * ctx, dim, device=device, dtype=dtype)
        pos = torch.randint(0, 16, (1, sum(lens), 2), device=device).float()
        return [x, c], t, y, [pos, None], layout
    x = torch.randn(s, lens[0], dim, device=device, dtype=dtype, requires_grad=True)
    c = torch.randn(s, ctx, dim, device=device, dtype=dtype)
    pos = torch.randint(0, 16, (s, lens[0], 2), device=device).float()
    return [x, c], t, y, [pos, None], None


def recompiles(cfg: MMDiTConfig, backend: str, dynamic: bool | None, packed: bool, batch: int, device, dtype,
               ignore_log: bool = False):
    """Compilations per call over 3 token counts; ignore_log hides models.attention's log.info from dynamo."""
    import models.attention

    ignored = {models.attention.log.info} if ignore_log else set()
    with torch._dynamo.config.patch(ignore_logger_methods=ignored):
        return _recompiles(cfg, backend, dynamic, packed, batch, device, dtype)


def _recompiles(cfg: MMDiTConfig, backend: str, dynamic: bool | None, packed: bool, batch: int, device, dtype):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = MMDiT(cfg).to(device, dtype)
    counter = CountingBackend(backend)
    for blocks in (model.dual, model.single):
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block, backend=counter, dynamic=dynamic)
    shapes = ([[64] * batch, [144] * batch, [256] * batch] if not packed
              else [[64, 256, 144, 100][:batch], [196, 64, 256, 81][:batch], [256, 144, 64, 225][:batch]])
    per_shape = []
    for lens in shapes:
        before = counter.graphs
        xs, t, y, pos, layout = inputs(cfg, lens, 8, packed, device, dtype)
        model(xs, t, y, pos, layout)[0].float().square().mean().backward()
        per_shape.append(counter.graphs - before)
    blocks = len(model.dual) + len(model.single)
    breaks = torch._dynamo.utils.counters["graph_break"]
    reasons = sorted({k.split("Explanation")[0].strip()[:70] for k in breaks})
    return shapes, per_shape, blocks, sum(breaks.values()), reasons


def adamw_step(model: MMDiT, xs, t, y, pos):
    """A training step of `model` on fixed inputs: forward, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(xs, t, y, pos)[0].float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor for real kernels)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2, help="dual and single blocks each")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="image tokens per sample for part 2")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="part 1: only the variants with attention logging ignored")
    ap.add_argument("--compile-step", action="store_true", help="part 3: MMDiTConfig.compile vs eager step time")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = MMDiTConfig(dim=args.dim, heads=args.heads, depth_dual=args.depth, depth_single=args.depth,
                      streams=2, out_streams=1, rope_axes=2)

    # ---- part 1: recompiles
    small = dataclasses.replace(cfg, dim=64, heads=4, depth_dual=1, depth_single=1)
    rows, all_reasons = [], set()
    variants = [(False, None, False), (False, True, False), (True, True, False),
                (False, None, True), (False, True, True), (True, True, True)]
    for packed, dynamic, ignore_log in variants[3:] if args.quick else variants:
        shapes, per_shape, blocks, breaks, reasons = recompiles(
            small, args.backend, dynamic, packed, 2, device, dtype, ignore_log)
        all_reasons.update(reasons)
        rows.append([
                "packed" if packed else "regular", "default (None)" if dynamic is None else "True",
                "ignored" if ignore_log else "traced",
                " / ".join(str(sum(s)) for s in shapes), " / ".join(str(n) for n in per_shape),
                sum(per_shape), blocks, breaks,
            ])
    body = "Part 1: dynamo graph compilations per call (model of 1 dual + 1 single block, dim 64, batch 2)\n\n"
    body += table(["batch", "dynamic", "attention log.info", "image tokens per call", "compilations per call", "total",
                   "compiled blocks", "graph breaks"], rows)
    body += "\n\ngraph-break reasons: " + ("; ".join(sorted(all_reasons)) or "none")

    # ---- part 2: checkpointing
    torch.manual_seed(0)
    models = {"checkpointing off": MMDiT(cfg).to(device, dtype)}
    models["checkpointing on"] = MMDiT(dataclasses.replace(cfg, checkpointing=True)).to(device, dtype)
    models["checkpointing on"].load_state_dict(models["checkpointing off"].state_dict())
    xs, t, y, pos, _ = inputs(cfg, [args.tokens] * args.batch, 32, False, device, dtype)
    for m in models.values():
        m.train()
    steps = {name: adamw_step(m, xs, t, y, pos) for name, m in models.items()}
    times = interleaved(steps, args.iters, 1, device)
    mem = {name: peak_memory(fn, device) for name, fn in steps.items()}
    off = "checkpointing off"
    rows = [[name, median(times[name]) * 1e3, median_ratio(times[name], times[off]), mib(mem[name]),
             mem[name] / mem[off]] for name in steps]
    body += (f"\n\nPart 2: activation checkpointing (dim {args.dim}, heads {args.heads}, depth {args.depth}+{args.depth}, "
             f"batch {args.batch} x {args.tokens} image + 32 context tokens, AdamW step)\n\n")
    body += table(["", "step ms (median)", "time ratio to off", "peak MiB above params", "memory ratio to off"], rows)
    if args.compile_step:
        # part 3: the config switch itself, MMDiTConfig.compile (inductor, dynamic shapes) vs eager
        torch._dynamo.reset()
        torch.manual_seed(0)
        pair = {"eager": MMDiT(cfg).to(device, dtype),
                "compile=True": MMDiT(dataclasses.replace(cfg, compile=True)).to(device, dtype)}
        pair["compile=True"].load_state_dict(pair["eager"].state_dict())
        runs = {name: adamw_step(m, xs, t, y, pos) for name, m in pair.items()}
        times = interleaved(runs, args.iters, 2, device)
        rows = [[name, median(times[name]) * 1e3, median_ratio(times[name], times["eager"])] for name in runs]
        body += "\n\nPart 3: MMDiTConfig.compile (per-block torch.compile, inductor, dynamic=True), same step\n\n"
        body += table(["", "step ms (median)", "time ratio to eager"], rows)
    config = dict(backend=args.backend, dtype=args.dtype, dim=args.dim, heads=args.heads, depth=args.depth,
                  batch=args.batch, tokens=args.tokens, rounds=args.iters,
                  memory="torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events")
    report("compile_memory", device, config, body)


if __name__ == "__main__":
    main()
