"""Blocks: adaLN-Zero identity at init, packed vs per-sample, small pieces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.blocks import DualStreamBlock, Mlp, SingleStreamBlock, TimestepEmbedder, modulate
from models.packing import Layout
from models.rope import rope_cos_sin

C, HEADS = 32, 4
AXES = [4, 4]  # head dim 8, two position axes


def _perturb_modulation(module: nn.Module, seed: int = 0) -> None:
    """Give every adaLN Linear (named `mod`) random weights so gates and shifts are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-2] == "mod":
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _perturb_qk_norms(module: nn.Module, seed: int = 1) -> None:
    """Distinct q and k norm weights, so a swapped or shared weight shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-2] in ("q_norm", "k_norm"):
                p.copy_(1 + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _rope(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return rope_cos_sin(torch.randint(0, 16, (b, n, len(AXES)), generator=g), AXES)


# ---------------------------------------------------------------- identity at init


@pytest.mark.parametrize("packed", [False, True])
def test_dual_stream_block_is_identity_at_init(packed: bool) -> None:
    block = DualStreamBlock(C, HEADS, n_streams=2, attn_backend="sdpa")
    if packed:
        layout = Layout.packed([[3, 5], [2, 2]])
        xs = [torch.randn(1, 8, C), torch.randn(1, 4, C)]
        rope = [_rope(1, 8, 0), None]
    else:
        layout = Layout()
        xs = [torch.randn(2, 8, C), torch.randn(2, 4, C)]
        rope = [_rope(2, 8, 0), None]
    c = torch.randn(2, C)
    out = block(xs, c, rope, layout)
    assert all(torch.equal(o, x) for o, x in zip(out, xs))

    _perturb_modulation(block)
    out = block(xs, c, rope, layout)
    assert all(o.shape == x.shape for o, x in zip(out, xs))
    assert not any(torch.allclose(o, x) for o, x in zip(out, xs))


def test_single_stream_block_is_identity_at_init() -> None:
    block = SingleStreamBlock(C, HEADS, attn_backend="sdpa")
    x, c = torch.randn(2, 9, C), torch.randn(2, C)
    rope = _rope(2, 9, 1)
    assert torch.equal(block(x, c, rope, Layout()), x)

    _perturb_modulation(block)
    out = block(x, c, rope, Layout())
    assert out.shape == x.shape and not torch.allclose(out, x)


# ---------------------------------------------------------------- against a hand-written reference


def _ref_attention(q, k, v):  # (B, N, H, D) each, plain softmax
    w = torch.einsum("bnhd,bmhd->bhnm", q, k).div(q.shape[-1] ** 0.5).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", w, v)


def _ref_rms(x, weight):
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * weight


def _ref_rope(x, cos, sin):  # pairs (2j, 2j+1) as complex numbers
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.complex(cos, sin)[:, :, None]).reshape(x.shape)


def _ln(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)


def test_dual_stream_block_matches_reference() -> None:
    """SD3 order written out: modulate, qkv, QK-norm, RoPE, joint attention, split, gated residuals."""
    torch.manual_seed(2)
    block = DualStreamBlock(C, HEADS, n_streams=2, attn_backend="sdpa").double()
    _perturb_modulation(block)
    _perturb_qk_norms(block)
    xs = [torch.randn(2, 5, C, dtype=torch.float64), torch.randn(2, 3, C, dtype=torch.float64)]
    c = torch.randn(2, C, dtype=torch.float64)
    rope = [_rope(2, 5, 3), None]
    out = block(xs, c, rope, Layout())

    qs, ks, vs, mods = [], [], [], []
    for x, p, r in zip(xs, block.streams, rope):
        m = (torch.nn.functional.silu(c) @ p.mod.weight.T + p.mod.bias)[:, None].chunk(6, -1)
        mods.append(m)
        h = _ln(x) * (1 + m[1]) + m[0]
        q, k, v = (h @ p.qkv.weight.T + p.qkv.bias).reshape(2, -1, 3, HEADS, C // HEADS).unbind(2)
        q, k = _ref_rms(q, p.q_norm.weight), _ref_rms(k, p.k_norm.weight)
        if r is not None:
            q, k = _ref_rope(q, *r), _ref_rope(k, *r)
        qs.append(q), ks.append(k), vs.append(v)
    a = _ref_attention(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)).reshape(2, 8, C)
    for x, o, p, m, a_s in zip(xs, out, block.streams, mods, a.split([5, 3], 1)):
        x = x + m[2] * p.proj(a_s)
        x = x + m[5] * p.mlp(_ln(x) * (1 + m[4]) + m[3])
        torch.testing.assert_close(o, x, rtol=1e-10, atol=1e-10)


def test_single_stream_block_matches_reference() -> None:
    torch.manual_seed(3)
    block = SingleStreamBlock(C, HEADS, attn_backend="sdpa").double()
    _perturb_modulation(block)
    _perturb_qk_norms(block)
    x, c = torch.randn(2, 7, C, dtype=torch.float64), torch.randn(2, 1, C, dtype=torch.float64)
    rope = _rope(2, 7, 4)
    shift, scale, gate = (torch.nn.functional.silu(c) @ block.mod.weight.T + block.mod.bias).chunk(3, -1)
    h = block.linear1(_ln(x) * (1 + scale) + shift)
    q, k, v = h[..., : 3 * C].reshape(2, 7, 3, HEADS, C // HEADS).unbind(2)
    q, k = _ref_rope(_ref_rms(q, block.q_norm.weight), *rope), _ref_rope(_ref_rms(k, block.k_norm.weight), *rope)
    a = _ref_attention(q, k, v).reshape(2, 7, C)
    mlp = torch.nn.functional.gelu(h[..., 3 * C :], approximate="tanh")
    expected = x + gate * block.linear2(torch.cat([a, mlp], -1))
    torch.testing.assert_close(block(x, c[:, 0], rope, Layout()), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- packed vs per sample


def test_dual_stream_block_packed_equals_per_sample() -> None:
    torch.manual_seed(0)
    block = DualStreamBlock(C, HEADS, n_streams=3, attn_backend="sdpa").double()
    _perturb_modulation(block)
    lengths = [[4, 7, 2], [3, 0, 5], [1, 1, 1]]
    layout = Layout.packed(lengths)
    xs = [torch.randn(1, sum(lens), C, dtype=torch.float64) for lens in lengths]
    pos = [torch.randint(0, 9, (1, sum(lens), 2)) for lens in lengths]
    c = torch.randn(3, C, dtype=torch.float64)
    rope = [rope_cos_sin(pos[0], AXES), None, rope_cos_sin(pos[2], AXES)]
    packed = block(xs, c, rope, layout)

    for i in range(3):
        xi = [x.split(lens, dim=1)[i] for x, lens in zip(xs, lengths)]
        pi = [p.split(lens, dim=1)[i] for p, lens in zip(pos, lengths)]
        rope_i = [rope_cos_sin(pi[0], AXES), None, rope_cos_sin(pi[2], AXES)]
        ref = block(xi, c[i : i + 1], rope_i, Layout())
        for s, lens in enumerate(lengths):
            torch.testing.assert_close(packed[s].split(lens, dim=1)[i], ref[s], rtol=1e-10, atol=1e-10)


def test_single_stream_block_packed_equals_per_sample() -> None:
    torch.manual_seed(1)
    block = SingleStreamBlock(C, HEADS, attn_backend="sdpa").double()
    _perturb_modulation(block)
    _perturb_qk_norms(block)
    seqlens = [5, 2, 6]
    layout = Layout.packed([seqlens])
    x = torch.randn(1, sum(seqlens), C, dtype=torch.float64)
    c = torch.randn(3, C, dtype=torch.float64)
    pos = torch.randint(0, 9, (1, sum(seqlens), 2))
    packed = block(x, c, rope_cos_sin(pos, AXES), layout)
    torch.testing.assert_close(block(x, c, rope_cos_sin(pos, AXES), Layout.packed([seqlens])), packed)  # a fresh index
    for i, (out, xi, pi) in enumerate(zip(packed.split(seqlens, 1), x.split(seqlens, 1), pos.split(seqlens, 1))):
        ref = block(xi, c[i : i + 1], rope_cos_sin(pi, AXES), Layout())
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- pieces


def test_without_qk_norm_and_rope() -> None:
    block = DualStreamBlock(C, HEADS, n_streams=1, qk_norm=False, attn_backend="sdpa")
    _perturb_modulation(block)
    assert isinstance(block.streams[0].q_norm, nn.Identity)
    x = torch.randn(2, 5, C)
    (out,) = block([x], torch.randn(2, C), [None], Layout())
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_modulate() -> None:
    x, shift, scale = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(modulate(x, shift, scale), x + x * scale + shift)


def test_mlp_and_timestep_embedder() -> None:
    assert Mlp(C, 3 * C)(torch.randn(2, 5, C)).shape == (2, 5, C)
    emb = TimestepEmbedder(C)
    out = emb(torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == (3, C)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    # t is scaled by 1000 inside: the highest frequency feature of t=0.001 is sin(1) / cos(1)
    feats = emb.sinusoid(torch.tensor([0.001]))
    torch.testing.assert_close(feats[0, 0], torch.cos(torch.tensor(1.0)))
    torch.testing.assert_close(feats[0, emb.freq_dim // 2], torch.sin(torch.tensor(1.0)))
