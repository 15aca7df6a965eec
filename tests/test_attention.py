"""Attention backends against each other and against per-sample runs; the packing Layout."""

from __future__ import annotations

import copy
import functools
import logging
import pickle
import types

import pytest
import torch
import torch.nn.functional as F

from models import attention as attn_mod
from models.attention import RMSNorm, attention, backend_report, resolve_backend
from models.packing import Layout

H, D = 2, 8


def _qkv(n: int, b: int = 1, dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, H, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3)]


def _random_lengths(seed: int, n_samples: int = 5, max_len: int = 13) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, max_len, (n_samples,), generator=g).tolist()


# ---------------------------------------------------------------- packed vs per sample


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_per_sample(backend: str, seed: int) -> None:
    seqlens = _random_lengths(seed)
    q, k, v = _qkv(sum(seqlens), seed=seed)
    packed = attention(q, k, v, Layout.packed([seqlens]), backend=backend)  # (1, N, H, D)

    per_sample = [
        attention(qs, ks, vs, backend="math")
        for qs, ks, vs in zip(*(t.split(seqlens, dim=1) for t in (q, k, v)))
    ]
    torch.testing.assert_close(packed, torch.cat(per_sample, dim=1), rtol=1e-10, atol=1e-10)


def test_packed_is_not_full_attention() -> None:
    """The block-diagonal mask matters: packed output differs from attending over everything."""
    seqlens = [4, 7]
    q, k, v = _qkv(sum(seqlens))
    layout = Layout.packed([seqlens])
    for backend in ("sdpa", "math"):
        assert not torch.allclose(attention(q, k, v, layout, backend), attention(q, k, v, None, backend))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_padded_batch_and_packed_agree(backend: str) -> None:
    seqlens = _random_lengths(3, n_samples=4)
    n_max = max(seqlens)
    q, k, v = _qkv(sum(seqlens))
    packed = attention(q, k, v, Layout.packed([seqlens]), backend=backend)

    # the same samples padded to n_max, keys masked past each length
    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.pad(s[0], (0, 0, 0, 0, 0, n_max - s.shape[1])) for s in t.split(seqlens, dim=1)])

    qp, kp, vp = (pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, N_max, D)
    valid = torch.arange(n_max)[None, :] < torch.tensor(seqlens)[:, None]  # (B, N_max)
    padded = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=valid[:, None, None, :]).transpose(1, 2)
    for i, (out, n) in enumerate(zip(packed.split(seqlens, dim=1), seqlens)):
        torch.testing.assert_close(out[0], padded[i, :n], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_regular_batch_equals_packed_equal_lengths(backend: str) -> None:
    b, n = 3, 6
    q, k, v = _qkv(n, b=b)
    regular = attention(q, k, v, backend=backend)  # (B, N, H, D)
    flat = [t.reshape(1, b * n, H, D) for t in (q, k, v)]
    packed = attention(*flat, Layout.packed([[n] * b]), backend=backend)
    torch.testing.assert_close(packed.reshape(b, n, H, D), regular, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- backends agree


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sdpa_matches_math(dtype: torch.dtype, tol: float) -> None:
    q, k, v = _qkv(17, b=2, dtype=dtype)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"), rtol=tol, atol=tol)


def test_math_matches_closed_form() -> None:
    """Independent check of the reference: softmax(q k^T / sqrt(D)) v written out by hand."""
    q, k, v = _qkv(5)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / D**0.5
    expected = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    torch.testing.assert_close(attention(q, k, v, backend="math"), expected)


@pytest.mark.parametrize("packed", [False, True])
def test_xformers_matches_sdpa(packed: bool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("xformers kernel needs CUDA")
    reason = attn_mod._xformers_reason(torch.device("cuda"))
    if reason:  # e.g. the pinned wheel under another torch build: auto falls back (tested below)
        pytest.skip(f"xformers: {reason}")
    layout = Layout.packed([[5, 11, 3]]) if packed else None
    q, k, v = _qkv(19, dtype=torch.float16, device="cuda")
    out = attention(q, k, v, layout, backend="xformers")
    ref = attention(q, k, v, layout, backend="sdpa")
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert resolve_backend(q.device, "auto") == "xformers"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_sdpa_varlen_matches_math_with_grads(dtype: torch.dtype) -> None:
    """CUDA half precision: packed SDPA runs torch's varlen flash kernel; outputs and grads = math's."""
    if not torch.cuda.is_available():
        pytest.skip("varlen flash kernel needs CUDA")
    seqlens = [5, 64, 0, 3, 200]
    assert attn_mod._varlen_ok(torch.zeros(1, 1, H, 64, device="cuda", dtype=dtype))
    grads = {}
    for backend in ("sdpa", "math"):
        q, k, v = (t.requires_grad_() for t in _qkv(sum(seqlens), dtype=dtype, device="cuda", seed=3))
        out = attention(q, k, v, Layout.packed([seqlens]), backend=backend)
        out.float().square().sum().backward()
        grads[backend] = [out.float(), *(t.grad.float() for t in (q, k, v))]
    for got, want in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- backend choice, errors, report


def test_auto_resolves_to_sdpa_on_cpu() -> None:
    assert resolve_backend(torch.device("cpu"), "auto") == "sdpa"
    assert resolve_backend(torch.device("cpu"), "math") == "math"


def test_forced_xformers_on_cpu_says_why() -> None:
    q, k, v = _qkv(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="xformers.*cpu"):
        attention(q, k, v, backend="xformers")


def test_unknown_backend_names_accepted_values() -> None:
    q, k, v = _qkv(4)
    with pytest.raises(ValueError, match="auto, xformers, sdpa, math"):
        attention(q, k, v, backend="flash")


def test_bad_seqlens_rejected() -> None:
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="sum"):
        attention(q, k, v, Layout.packed([[2, 3]]))
    q, k, v = _qkv(6, b=2)
    with pytest.raises(ValueError, match="B == 1"):
        attention(q, k, v, Layout.packed([[3, 3]]))


def test_backend_report_runs_kernels() -> None:
    report = backend_report()
    assert report["sdpa"].startswith("ok") and report["math"].startswith("ok")
    if torch.cuda.is_available() and not attn_mod._xformers_reason(torch.device("cuda")):
        assert report["xformers"] == "ok (cuda)"
    else:
        assert report["xformers"].startswith("unavailable: ") and len(report["xformers"]) > len("unavailable: ")


def test_kernel_is_chosen_once_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a block resolves the backend; running it, regular or packed, never does again."""
    from models.blocks import DualStreamBlock, SingleStreamBlock

    calls = []
    resolve = attn_mod.resolve_backend
    monkeypatch.setattr(attn_mod, "resolve_backend", lambda *a, **kw: calls.append(a) or resolve(*a, **kw))
    dual = DualStreamBlock(16, 2, n_streams=2, attn_backend="auto")
    single = SingleStreamBlock(16, 2, attn_backend="sdpa")
    assert len(calls) == 2 and dual.attend.name == "sdpa" and single.attend.name == "sdpa"  # CPU: sdpa either way
    c = torch.randn(2, 16)
    for layout, xs in [
        (Layout(), [torch.randn(2, 5, 16), torch.randn(2, 3, 16)]),
        (Layout.packed([[2, 3], [1, 2]]), [torch.randn(1, 5, 16), torch.randn(1, 3, 16)]),
    ]:
        for _ in range(3):
            out = dual(xs, c, [None, None], layout)
            single(layout.join(out), c, None, layout)
    assert len(calls) == 2


def test_kernel_deep_copies_and_pickles() -> None:
    """A kernel is immutable: deepcopy shares it (even one holding the xformers module, which cannot be
    copied), pickle chooses it again where it is loaded; so a block copies and pickles."""
    from models.blocks import SingleStreamBlock

    holds_module = functools.partial(attn_mod._xformers_or_sdpa, xops=types.ModuleType("xformers.ops"))
    kernel = attn_mod.Kernel("auto", "xformers on CUDA, else sdpa", holds_module, attn_mod._sdpa)
    assert copy.deepcopy(kernel) is kernel
    again = pickle.loads(pickle.dumps(kernel))
    assert isinstance(again, attn_mod.Kernel) and again.backend == "auto"
    assert again.name == attn_mod.select_kernel("auto").name
    block = SingleStreamBlock(16, 2, attn_backend="math")
    x, c = torch.randn(2, 3, 16), torch.randn(2, 16)
    for copied in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert copied.attend.name == "math" and torch.equal(copied(x, c, None, Layout()), block(x, c, None, Layout()))


def test_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    attn_mod._log_choice.cache_clear()
    q, k, v = _qkv(4)
    with caplog.at_level(logging.INFO, logger="duoflow.attention"):
        attention(q, k, v, backend="auto")
        attention(q, k, v, backend="auto")
    msgs = [r.getMessage() for r in caplog.records if r.name == "duoflow.attention"]
    assert len(msgs) == 1 and "sdpa" in msgs[0]


# ---------------------------------------------------------------- RMSNorm


def test_rmsnorm_unit_rms_and_dtype() -> None:
    norm = RMSNorm(D)
    x = torch.randn(2, 3, H, D, dtype=torch.bfloat16) * 50
    out = norm(x)
    assert out.dtype == torch.bfloat16
    rms = out.float().pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    torch.testing.assert_close(norm(x).float(), 2 * out.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- Layout


def _tagged_streams(lengths: list[list[int]], trailing: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Packed streams whose every token holds 100 * sample + 10 * stream + its index within the segment."""
    xs = []
    for s, lens in enumerate(lengths):
        vals = [100 * i + 10 * s + j for i, n in enumerate(lens) for j in range(n)]
        x = torch.tensor(vals, dtype=torch.float64).reshape(1, -1, *([1] * len(trailing)))
        xs.append(x.expand(1, -1, *trailing).clone())
    return xs


@pytest.mark.parametrize("trailing", [(), (4,), (H, D)])
def test_layout_packed_join_orders_by_sample_and_split_inverts(trailing: tuple[int, ...]) -> None:
    lengths = [[3, 1, 2], [2, 0, 4], [1, 1, 1]]
    layout = Layout.packed(lengths)
    xs = _tagged_streams(lengths, trailing)
    joined = layout.join(xs)
    assert joined.shape == (1, 15, *trailing)
    expected = [100 * i + 10 * s + j for i in range(3) for s in range(3) for j in range(lengths[s][i])]
    assert joined[0].reshape(15, -1)[:, 0].tolist() == expected
    assert layout.joint_seqlens() == [6, 2, 7]
    for x, back in zip(xs, layout.split(joined)):
        assert torch.equal(x, back)


def test_layout_regular_join_split_round_trip() -> None:
    layout = Layout()
    xs = [torch.randn(2, n, H, D) for n in (5, 3, 1)]
    joined = layout.join(xs)
    assert torch.equal(joined, torch.cat(xs, dim=1))
    for x, back in zip(xs, layout.split(joined, sizes=[5, 3, 1])):
        assert torch.equal(x, back)
    for x, back in zip(xs, Layout().split(joined, sizes=[5, 3, 1])):
        assert torch.equal(x, back)
    with pytest.raises(ValueError, match="sizes"):
        Layout().split(joined)
    assert layout.joint_seqlens() is None and layout.num_samples() is None and layout.stream_seqlens(0) is None


def test_layout_expand() -> None:
    per_sample = torch.arange(3.0)[:, None].expand(3, 4)  # (S, F): row i holds i
    assert Layout().expand(per_sample, 0).shape == (3, 1, 4)
    layout = Layout.packed([[2, 1, 3], [1, 1, 1]])
    e0, e1 = layout.expand(per_sample, 0), layout.expand(per_sample, 1)
    assert e0.shape == (1, 6, 4) and e1.shape == (1, 3, 4)
    assert e0[0, :, 0].tolist() == [0, 0, 1, 2, 2, 2]
    assert e1[0, :, 0].tolist() == [0, 1, 2]
    assert layout.num_samples() == 3 and layout.stream_seqlens(0) == [2, 1, 3]


def test_layout_packed_ops_have_exact_gradients() -> None:
    """Gradients of join/split/expand against finite differences, with an empty sample in one stream."""
    lengths = [[3, 0, 2], [1, 2, 1]]
    layout = Layout.packed(lengths)
    a = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    per_sample = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 9, 3, dtype=torch.float64)  # makes the split's input differ from the join's output
    assert torch.autograd.gradcheck(lambda a, b: layout.join([a, b]), (a, b))
    assert torch.autograd.gradcheck(lambda a, b: tuple(layout.split(layout.join([a, b]) * w)), (a, b))
    assert torch.autograd.gradcheck(lambda p: (layout.expand(p, 0), layout.expand(p, 1)), (per_sample,))


@pytest.mark.parametrize("lengths", [[[3, 0, 2], [1, 2, 1]], [[5, 1]], [[0, 4, 2], [2, 2, 2], [1, 0, 3]]])
def test_layout_cached_index_matches_closed_forms(lengths: list[list[int]]) -> None:
    """Segment ids, cu_seqlens and max_seqlen of the joined sequence and of each stream, built once per device."""
    layout = Layout.packed(lengths)
    joint = [sum(per_stream) for per_stream in zip(*lengths)]
    s = len(joint)
    assert layout.joint().lengths == [joint] and layout.joint() is layout.joint()
    assert layout.max_seqlen == max(joint) and type(layout.max_seqlen) is int and layout.num_tokens == sum(joint)
    ids = layout.segment_ids("cpu")
    assert ids.dtype == torch.long and ids.tolist() == [i for i in range(s) for _ in range(joint[i])]
    cu = layout.cu_seqlens("cpu")
    assert cu.dtype == torch.int32 and cu.shape == (s + 1,)
    assert cu.tolist() == [sum(joint[:i]) for i in range(s + 1)]
    for st, lens in enumerate(lengths):
        stream = layout.stream(st)
        assert stream.stream(0) is stream and stream.joint() is stream  # one stream: its own joint
        assert stream.segment_ids("cpu").tolist() == [i for i in range(s) for _ in range(lens[i])]
        assert stream.cu_seqlens("cpu").tolist() == [sum(lens[:i]) for i in range(s + 1)]
        assert stream.max_seqlen == max(lens)
    # cached per device: the same tensors on every call; another device gets its own copy, once
    assert layout.segment_ids("cpu") is ids and layout.cu_seqlens("cpu") is cu
    assert layout.to("meta") is layout
    on_meta = layout.segment_ids("meta")
    assert on_meta.device.type == "meta" and on_meta.shape == ids.shape and layout.segment_ids("meta") is on_meta
    assert layout.stream(0).segment_ids("meta").device.type == "meta"  # `to` filled the streams' caches too


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_layout_split_of_join_is_the_identity(packed: bool, seed: int) -> None:
    """split(join(xs), sizes) == xs, sizes given explicitly: join leaves no state behind for split."""
    g = torch.Generator().manual_seed(seed)
    n_streams, n_samples = 3, 4
    lengths = torch.randint(0, 6, (n_streams, n_samples), generator=g).tolist()
    if packed:
        layout = Layout.packed(lengths)
        xs = [torch.randn(1, sum(lens), H, D, generator=g) for lens in lengths]
    else:
        layout = Layout()
        xs = [torch.randn(n_samples, lens[0], H, D, generator=g) for lens in lengths]
    sizes = [x.shape[1] for x in xs]
    joined = Layout.packed(lengths).join(xs) if packed else Layout().join(xs)  # another instance joins
    for x, back in zip(xs, layout.split(joined, sizes=sizes), strict=True):
        assert torch.equal(x, back)
    if packed:  # a packed layout knows its stream sizes
        assert all(torch.equal(x, back) for x, back in zip(xs, layout.split(joined), strict=True))
        with pytest.raises(ValueError, match="do not match"):
            layout.split(joined, sizes=sizes[::-1] if sizes != sizes[::-1] else [s + 1 for s in sizes])
    else:
        with pytest.raises(ValueError, match="sizes"):
            layout.split(joined)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_over_a_multi_stream_layout_is_over_its_joint_sequence(backend: str) -> None:
    lengths = [[3, 1, 4], [2, 2, 0]]
    layout = Layout.packed(lengths)
    q, k, v = _qkv(12)
    out = attention(q, k, v, layout, backend=backend)
    torch.testing.assert_close(out, attention(q, k, v, layout.joint(), backend=backend), rtol=0, atol=0)
    per_sample = [attention(*parts, backend="math") for parts in zip(*(t.split([5, 3, 4], dim=1) for t in (q, k, v)))]
    torch.testing.assert_close(out, torch.cat(per_sample, dim=1), rtol=1e-10, atol=1e-10)


def test_layout_rejects_inconsistent_lengths() -> None:
    with pytest.raises(ValueError, match="same"):
        Layout.packed([[1, 2], [3]])
    layout = Layout.packed([[2, 2]])
    with pytest.raises(ValueError, match="stream 0"):
        layout.join([torch.zeros(1, 5, 2)])


def test_xformers_without_kernels_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheel built for another torch imports but raises at the first call: auto must not pick it."""
    import models.attention as A

    class NoKernels:
        @staticmethod
        def memory_efficient_attention(q, k, v, attn_bias=None):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(A, "_load_xformers", lambda: (NoKernels, ""))
    reason = A._probe_xformers.__wrapped__("cpu")
    assert "kernels unusable" in reason and "NotImplementedError" in reason
