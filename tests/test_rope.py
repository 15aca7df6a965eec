"""n-D axial RoPE: relative-position property, norm preservation, a complex-number reference."""

from __future__ import annotations

import pytest
import torch

from models.rope import apply_rope, default_axes_dims, rope_cos_sin

H, D = 2, 24


def _scores(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, axes_dims: list[int]) -> torch.Tensor:
    cos, sin = rope_cos_sin(pos, axes_dims)
    return torch.einsum("bnhd,bmhd->bhnm", apply_rope(q, cos, sin), apply_rope(k, cos, sin))


@pytest.mark.parametrize("n_axes", [1, 2, 3])
def test_scores_depend_only_on_relative_offset(n_axes: int) -> None:
    g = torch.Generator().manual_seed(n_axes)
    n = 10
    q, k = (torch.randn(1, n, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    pos = torch.randint(0, 32, (1, n, n_axes), generator=g)
    axes_dims = default_axes_dims(D, n_axes)
    base = _scores(q, k, pos, axes_dims)

    shift = torch.tensor([7, -3, 120][:n_axes])  # a different constant per axis
    torch.testing.assert_close(_scores(q, k, pos + shift, axes_dims), base, rtol=1e-5, atol=1e-5)

    # non-vacuous: moving one token along any axis does change its scores
    for a in range(n_axes):
        moved = pos.clone()
        moved[0, 0, a] += 1
        assert not torch.allclose(_scores(q, k, moved, axes_dims), base, atol=1e-3)


def test_rotation_preserves_norm_and_dtype() -> None:
    x = torch.randn(2, 5, H, D, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.rand(2, 5, 3) * 100, default_axes_dims(D, 3))
    assert cos.dtype == torch.float32 and cos.shape == (2, 5, D // 2)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    x64 = x.double()
    torch.testing.assert_close(apply_rope(x64, cos, sin).norm(dim=-1), x64.norm(dim=-1), rtol=1e-6, atol=1e-6)


def test_matches_complex_reference() -> None:
    """Pairs (x[2j], x[2j+1]) as complex numbers multiplied by exp(i * pos_a * theta^(-2j/d_a)), per axis."""
    axes_dims, theta = [8, 10, 6], 100.0
    x = torch.randn(1, 4, H, D, dtype=torch.float64)
    pos = torch.randn(1, 4, 3, dtype=torch.float64) * 5
    freqs = torch.cat([theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dims])
    axis_of_pair = torch.repeat_interleave(torch.arange(3), torch.tensor([d // 2 for d in axes_dims]))
    angles = pos[..., axis_of_pair] * freqs  # (1, 4, D/2)
    xc = torch.view_as_complex(x.reshape(1, 4, H, D // 2, 2).contiguous())
    expected = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, :, None]).reshape(x.shape)
    torch.testing.assert_close(apply_rope(x, *rope_cos_sin(pos, axes_dims, theta)), expected, rtol=1e-6, atol=1e-6)


def test_position_zero_is_identity() -> None:
    x = torch.randn(1, 3, H, D)
    cos, sin = rope_cos_sin(torch.zeros(1, 3, 2), [12, 12])
    assert torch.equal(apply_rope(x, cos, sin), x)


def test_default_axes_dims() -> None:
    assert default_axes_dims(24, 3) == [8, 8, 8]
    assert default_axes_dims(16, 3) == [6, 6, 4]
    assert default_axes_dims(64, 1) == [64]
    for head_dim, n in [(15, 1), (4, 3), (8, 0)]:
        with pytest.raises(ValueError):
            default_axes_dims(head_dim, n)


def test_bad_positions_rejected() -> None:
    with pytest.raises(ValueError, match="positions"):
        rope_cos_sin(torch.zeros(1, 3, 2), [8, 8, 8])
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.zeros(1, 3, 2), [7, 9])


def test_qk_norm_and_rope_in_bf16_round_about_twice() -> None:
    """QK-norm then RoPE on bf16 queries (float32 norm weight, as bf16-mixed training has it), as the
    blocks run them: torch's rms_norm (weight in bf16) then RoPE, each rounding once to bf16. The bound
    is 1.5 x 2^-9 (half a bf16 ulp is 2^-9) relative to the float64 result; measured: this path 0.0028,
    a third rounding (the norm weight as a multiply of its own) 0.0032, fails it; the float32 path
    these replaced 0.0017."""
    from models.attention import RMSNorm

    g = torch.Generator().manual_seed(0)
    b, n, h, d = 4, 256, 8, 64
    pos = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(1, -1, 2)
    cos, sin = rope_cos_sin((pos * 3).expand(b, -1, -1), [d // 2, d // 2])
    q = (torch.randn(b, n, h, d, generator=g) * 3 + 0.5).to(torch.bfloat16)
    norm = RMSNorm(d)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
    out = apply_rope(norm(q), cos, sin)

    x = q.double()
    want = apply_rope(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double(), cos.double(),
                      sin.double())
    assert out.dtype == torch.bfloat16
    assert ((out.double() - want).norm() / want.norm()).item() < 1.5 * 2**-9
