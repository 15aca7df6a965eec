"""Shared helpers of the benchmarks: device description, interleaved timing, peak memory, Markdown output.

Every benchmark prints a Markdown block (command, device, date, torch version, config, table)
and writes the same text to bench/results/<name>-<device>.md, so BENCHMARKS.md only ever
holds numbers a script printed.
"""

from __future__ import annotations

import argparse

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
"""Where reports are written; BENCH_RESULTS moves them (bench/gpu_check.sh --dry-run keeps bench/results/ as it is)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], iters: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured A B A B ... in one process so load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-round ratios a_i / b_i (rounds are adjacent in time, so load cancels)."""
    return statistics.median(x / y for x, y in zip(a, b))


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn runs, above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocation/free events of torch.profiler
    (profile_memory=True), summed in time order.
    """
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, device: torch.device, config: dict[str, object], body: str) -> str:
    """Print the Markdown block of one run and write it to bench/results/<name>-<cpu|cuda>.md."""
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    text = "\n".join(
        [
            f"`{command}`",
            "",
            f"- device: {device_name(device)}",
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- torch {torch.__version__}",
            f"- config: {cfg}",
            "",
            body.strip(),
            "",
        ]
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}-{device.type}.md").write_text(text)
    return text


def profile_top(step, k: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=k)


LIBRARY_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product")
"""Matmul and attention library kernels: the same calls in any implementation of one architecture."""


def library_share(step, iters: int = 3) -> tuple[float, float, float]:
    """(seconds per step, of which in LIBRARY_OPS, of which in the optimizer step) from CPU self times
    over `iters` profiled steps.

    Matmul/attention calls and an optimizer both sides share are fixed costs; what is left
    (elementwise, norms, Python) is all a model's own code can change, so (library + optimizer) /
    (a peer's step time) is the lowest step-time ratio any rewrite could reach. CPU only: on a GPU
    the profiler's rows mix ops and kernels (use flops.py's kernel table there)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    library = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in LIBRARY_OPS))
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#"))
    return total / iters / 1e6, library / iters / 1e6, optimizer / iters / 1e6


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def parser(doc: str | None, dim: int | None = None, heads: int = 4, depth_dual: int = 2,
           depth_single: int = 1) -> argparse.ArgumentParser:
    """The flags every benchmark shares (device, dtype) and, with `dim`, the backbone's shape."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--heads", type=int, default=heads)
    if dim is not None:
        ap.add_argument("--dim", type=int, default=dim)
        ap.add_argument("--depth-dual", type=int, default=depth_dual)
        ap.add_argument("--depth-single", type=int, default=depth_single)
        ap.add_argument("--compile", action="store_true", help="MMDiTConfig.compile: torch.compile each block")
    return ap


def backbone_from_args(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The MMDiT ([x, ctx] streams, 2-D RoPE) that the --dim/--heads/--depth-* flags describe, seeded."""
    from models.backbone import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    cfg = MMDiTConfig(dim=args.dim, heads=args.heads, depth_dual=args.depth_dual, depth_single=args.depth_single,
                      streams=2, out_streams=1, rope_axes=2, compile=getattr(args, "compile", False))
    return MMDiT(cfg).to(device, dtype)
