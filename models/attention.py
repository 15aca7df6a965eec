"""The one attention entry point: backend choice, tensor layout, packed (varlen) batches.

Backends:
  xformers  memory_efficient_attention; packed batches use a BlockDiagonalMask. CUDA only
            (xformers 0.0.35 ships no CPU kernel). Imported lazily here and nowhere else.
  sdpa      torch scaled_dot_product_attention; packed batches go to torch's varlen flash
            kernel on CUDA in half precision (one call), else loop over the segments; either
            way the cost is sum(n_i^2), not the N^2 a dense block-diagonal mask would cost.
  math      naive softmax in (at least) float32 with a dense mask: the reference for tests.
  auto      xformers when it imports and the tensors are on CUDA, else sdpa.

The choice is made once, when a block is built (`select_kernel`, nanoGPT's `self.flash`): what
can be known then (xformers imports, its kernels run on this machine's GPU) is settled, and a
call only branches on the tensors' device and dtype, which torch.compile resolves statically.
Packed batches read their offsets from the batch's `Layout` (models/packing.py), built once per
batch, not per call.

Legend: B batch, N tokens, S samples, H heads, D head dim.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.packing import Layout

log = logging.getLogger("duoflow.attention")

BACKENDS = ("auto", "xformers", "sdpa", "math")


# ---------------------------------------------------------------- xformers, lazily


@functools.lru_cache(maxsize=None)
def _load_xformers() -> tuple[ModuleType | None, str]:
    """Import xformers.ops once; return (module, "") or (None, why it is unavailable)."""
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a broken build raising something else
        reason = f"{type(e).__name__}: {e}".strip()
        log.info("xformers unavailable: %s", reason)
        return None, reason
    return xops, ""


def _xformers_reason(device: torch.device) -> str:
    """Why xformers cannot run on `device`, or "" if it can (import, device type and a probe call)."""
    xops, reason = _load_xformers()
    if xops is None:
        return f"import failed ({reason})"
    if device.type != "cuda":
        return f"no {device.type} kernel in xformers (needs CUDA tensors)"
    return _probe_xformers(str(device))


@functools.lru_cache(maxsize=None)
def _probe_xformers(device: str) -> str:
    """One tiny call on `device`: an xformers wheel built for another torch/CUDA imports fine but has no
    kernels (NotImplementedError at the first call), and auto must then fall back to SDPA."""
    xops, _ = _load_xformers()
    try:
        q = torch.zeros(1, 8, 1, 16, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:
        reason = f"kernels unusable on {device} ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        log.warning("xformers %s; attention 'auto' uses SDPA", reason)
        return reason
    return ""


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend `attention` runs on `device` for the requested `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        return "xformers" if not _xformers_reason(device) else "sdpa"
    if backend == "xformers":
        reason = _xformers_reason(device)
        if reason:
            raise RuntimeError(f"attention backend 'xformers' cannot run on {device}: {reason}")
    return backend


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str) -> None:
    log.info("attention: requested %r -> using %s", requested, chosen)


# ---------------------------------------------------------------- kernels
# Each takes q, k, v (B, N|M, H, D) and the packed layout (None: dense) and returns (B, N, H, D).


def _xformers(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None, xops: ModuleType) -> Tensor:
    bias = None
    if layout is not None:  # the mask holds the offsets on the device: built once per batch, not per block
        bias = layout.cached(
            ("xformers_mask", q.device),
            lambda: xops.fmha.BlockDiagonalMask.from_seqlens(layout.joint_seqlens(), device=q.device),
        )
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, N, H, D), xformers' own layout


def _xformers_or_sdpa(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None, xops: ModuleType) -> Tensor:
    """auto on CUDA: xformers has no float64 kernel, and auto should not fail on it."""
    if q.dtype == torch.float64:
        return _sdpa(q, k, v, layout)
    return _xformers(q, k, v, layout, xops)


def _refuse_xformers(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None) -> Tensor:
    """A forced xformers on a device it cannot run on: say why, for that device."""
    raise RuntimeError(f"attention backend 'xformers' cannot run on {q.device}: {_xformers_reason(q.device)}")


def _sdpa_dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    q, k, v = (rearrange(t, "b n h d -> b h n d") for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
    return rearrange(out, "b h n d -> b n h d")


def _varlen_fits(q: Tensor) -> bool:
    """torch's varlen flash kernel takes CUDA half precision with head dim <= 256."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _varlen_ok(q: Tensor) -> bool:
    """torch's varlen flash kernel: CUDA, half precision, head dim <= 256, and present in this torch."""
    return _varlen_fits(q) and _varlen_attn() is not None


@functools.lru_cache(maxsize=None)
def _varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _sdpa(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None, varlen: Callable | None = None) -> Tensor:
    """varlen: torch's varlen flash function (CUDA only), None for the per-segment loop."""
    if layout is None:
        return _sdpa_dense(q, k, v)
    if varlen is not None and _varlen_fits(q):
        # one flash call over the packed batch (cumulative offsets), like xformers' BlockDiagonalMask;
        # the offsets and the longest sample come cached from the layout: no copy, no device sync
        cu = layout.cu_seqlens(q.device)  # (S+1,) int32
        out = varlen(q[0], k[0], v[0], cu, cu, layout.max_seqlen, layout.max_seqlen)  # (N, H, D)
        return out[None]
    # one call per segment: sum(n_i^2) work, no N x N mask
    seqlens = layout.joint_seqlens()
    segs = [
        _sdpa_dense(qs, ks, vs) if n > 0 else qs
        for n, qs, ks, vs in zip(seqlens, *(t.split(seqlens, dim=1) for t in (q, k, v)))
    ]
    return torch.cat(segs, dim=1)  # (1, N, H, D)


def _math(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None) -> Tensor:
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (rearrange(t.to(dtype), "b n h d -> b h n d") for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if layout is not None:
        seg = layout.segment_ids(q.device)  # (N,) token -> sample
        scores = scores.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ vf  # (B, H, N, D)
    return rearrange(out, "b h n d -> b n h d").to(q.dtype)


# ---------------------------------------------------------------- the entry point

Run = Callable[[Tensor, Tensor, Tensor, Layout | None], Tensor]
"""A kernel's body: q, k, v and the packed layout (None: dense)."""


@dataclass(frozen=True)
class Kernel:
    """Attention with its backend chosen once, at build time; `select_kernel` makes one.

    Called as kernel(q, k, v, layout=None): q (B, N, H, D) and k, v (B, M, H, D) in, (B, N, H, D)
    out, scale 1/sqrt(D). M may differ from N (cross-attention, e.g. the shape encoder's latent
    queries over points). A packed `layout` (B == 1, N == its tokens) makes a token of sample i
    attend only to sample i (block-diagonal) of the joined sequence; None or a regular layout is dense.
    """

    backend: str
    """The requested backend (auto, xformers, sdpa or math)."""
    name: str
    """What runs, for logs and tests: "sdpa", "math", "xformers", or auto's "xformers on CUDA, else sdpa"."""
    cuda: Run
    """Runs CUDA tensors."""
    other: Run
    """Runs tensors on any other device."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layout: Layout | None = None) -> Tensor:
        packed = _checked(q, k, v, layout)
        return (self.cuda if q.is_cuda else self.other)(q, k, v, packed)

    def __deepcopy__(self, memo: dict) -> "Kernel":
        return self  # immutable; and a kernel may hold the xformers module, which cannot be copied

    def __reduce__(self) -> tuple:
        return select_kernel, (self.backend,)  # pickled (e.g. ddp_spawn): chosen again where it is loaded


def _checked(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None) -> Layout | None:
    """Shape checks; returns the layout when it is packed, None when attention is dense."""
    if (q.ndim != 4 or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]
            or v.shape[:3] != k.shape[:3]):
        raise ValueError(
            f"attention expects q (B, N, H, D) and k, v (B, M, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if layout is None or not layout.is_packed:
        return None
    if k.shape != q.shape:
        raise ValueError(f"attention: a packed layout needs self-attention (k like q), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.shape[0] != 1 or layout.num_tokens != q.shape[1]:
        raise ValueError(
            f"attention: a packed layout needs B == 1 and N == its tokens, got B={q.shape[0]}, "
            f"N={q.shape[1]}, sum(seqlens)={layout.num_tokens}"
        )
    return layout


def select_kernel(backend: str = "auto") -> Kernel:
    """The attention a block runs for `backend`, decided now (at build time), not per call.

    The tensors' device is not known yet (a model is built on the CPU, then moved), so what
    depends on it is a static branch at the call: auto takes xformers for CUDA tensors when it
    imports and its probe runs on this machine's GPU, sdpa for the rest; a forced xformers
    raises at the call, with the reason, for tensors it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    if backend == "xformers":
        xops, _ = _load_xformers()
        runs = xops is not None and (gpu is None or not _xformers_reason(gpu))
        kernel = Kernel(backend, "xformers", functools.partial(_xformers, xops=xops) if runs else _refuse_xformers,
                        _refuse_xformers)
    else:
        name = resolve_backend(gpu or torch.device("cpu"), backend)
        if name == "math":
            kernel = Kernel(backend, "math", _math, _math)
        elif name == "sdpa":
            kernel = Kernel(backend, "sdpa", functools.partial(_sdpa, varlen=_varlen_attn()), _sdpa)
        else:  # auto, and xformers runs on the GPU
            kernel = Kernel(backend, "xformers on CUDA, else sdpa",
                            functools.partial(_xformers_or_sdpa, xops=_load_xformers()[0]), _sdpa)
    _log_choice(backend, kernel.name)
    return kernel


def attention(q: Tensor, k: Tensor, v: Tensor, layout: Layout | None = None, backend: str = "auto") -> Tensor:
    """Softmax attention with `backend` (see `Kernel` for shapes and `layout`).

    Chooses the kernel at every call: for tests, tools and one-off calls. A module that attends
    on every step keeps `select_kernel(backend)` from its constructor instead."""
    return select_kernel(backend)(q, k, v, layout)


def backend_report() -> dict[str, str]:
    """What really runs here, for `doctor`: each backend is tried on a tiny input."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    layout = Layout.packed([[3, 5]])
    report: dict[str, str] = {}
    for name in ("xformers", "sdpa", "math"):
        ok, errors = [], []
        for dev in devices:
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
            q = torch.randn(1, 8, 2, 16, device=dev, dtype=dtype)
            try:
                out = attention(q, q, q, layout, backend=name)
                if not torch.isfinite(out).all():
                    raise RuntimeError("non-finite output")
                ok.append(dev.type)
            except Exception as e:
                errors.append(f"{dev.type}: {e}")
        report[name] = f"ok ({', '.join(ok)})" if ok else f"unavailable: {'; '.join(errors)}"
    report["auto"] = ", ".join(f"{d.type} -> {resolve_backend(d)}" for d in devices)
    return report


# ---------------------------------------------------------------- QK norm


class RMSNorm(nn.Module):
    """RMS norm over the last dim; used as QK-norm so attention logits stay bounded in bf16 (SD3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """torch's rms_norm: one fused kernel on CUDA, accumulating in float32, x's dtype out."""
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)

