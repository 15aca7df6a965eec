"""MMDiT: shapes for 1-3 streams, packed == per-sample, checkpointing, config errors, gradients, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.backbone import MMDiT, MMDiTConfig
from models.packing import Layout

SMALL = dict(dim=32, heads=4, depth_dual=2, depth_single=1, attn_backend="sdpa",  # head dim 8
             streams=2, out_streams=1, rope_axes=2)  # an MMDiT alone states what a generator derives
AXES = (1, 2, 3)


def _model(streams: int, out_streams: int = 1, seed: int = 0, **kw: object) -> MMDiT:
    torch.manual_seed(seed)
    cfg = MMDiTConfig(**{**SMALL, "streams": streams, "out_streams": out_streams, "rope_axes": 2, **kw})
    model = MMDiT(cfg)
    _perturb_modulation(model, seed)
    return model


def _perturb_modulation(model: nn.Module, seed: int = 0) -> None:
    """Non-zero adaLN weights: otherwise every block is the identity and most tests are vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2] == "mod":
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _inputs(lengths: list[list[int]], dim: int, rope_axes: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Packed inputs for lengths [stream][sample]; the last stream (if > 1) has no positions, like a text context."""
    g = torch.Generator().manual_seed(seed)
    n_samples = len(lengths[0])
    xs = [torch.randn(1, sum(lens), dim, generator=g, dtype=torch.float64).to(dtype) for lens in lengths]
    pos = [torch.randint(0, 12, (1, sum(lens), rope_axes), generator=g) for lens in lengths]
    if len(lengths) > 1:
        pos[-1] = None
    t = torch.rand(n_samples, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n_samples, dim, generator=g, dtype=torch.float64).to(dtype)
    return xs, t, y, pos


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("streams,out_streams", [(1, 1), (2, 1), (3, 2)])
def test_output_shapes_regular_and_packed(streams: int, out_streams: int) -> None:
    model = _model(streams, out_streams)
    sizes = [6, 4, 3][:streams]
    b = 2
    xs = [torch.randn(b, n, 32) for n in sizes]
    pos = [torch.randint(0, 8, (1, n, 2)) for n in sizes]  # batch 1 positions broadcast over B
    out = model(xs, torch.rand(b), None, pos)
    assert [o.shape for o in out] == [(b, n, 32) for n in sizes[:out_streams]]

    lengths = [[2, 5, 1], [3, 3, 0], [1, 2, 4]][:streams]
    pxs, t, y, ppos = _inputs(lengths, 32, 2)
    out = model(pxs, t, y, ppos, Layout.packed(lengths))
    assert [o.shape for o in out] == [(1, sum(lens), 32) for lens in lengths[:out_streams]]
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("rope_axes", AXES)
def test_rope_axes(rope_axes: int) -> None:
    model = _model(2, rope_axes=rope_axes)
    xs, t, y, pos = _inputs([[5, 3], [2, 2]], 32, rope_axes)
    (out,) = model(xs, t, y, pos, Layout.packed([[5, 3], [2, 2]]))
    assert out.shape == (1, 8, 32)


@pytest.mark.parametrize("depth_dual,depth_single", [(2, 0), (0, 2)])
def test_positions_are_relative_in_every_block_kind(depth_dual: int, depth_single: int) -> None:
    model = _model(2, depth_dual=depth_dual, depth_single=depth_single).double().eval()
    lengths = [[5, 3], [2, 4]]
    xs, t, y, _ = _inputs(lengths, 32, 2, dtype=torch.float64)
    # every stream positioned: a stream without positions acts as if it sat at position 0
    pos = [torch.randint(0, 12, (1, sum(lens), 2)) for lens in lengths]
    layout = Layout.packed(lengths)
    (out,) = model(xs, t, y, pos, layout)
    (shifted,) = model(xs, t, y, [p + torch.tensor([3, -7]) for p in pos], layout)
    (no_pos,) = model(xs, t, y, [None, None], layout)
    torch.testing.assert_close(shifted, out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(no_pos, out, atol=1e-3)


def test_output_depends_on_t_and_y() -> None:
    model = _model(2).eval()
    lengths = [[5, 3], [2, 4]]
    xs, t, y, pos = _inputs(lengths, 32, 2)
    layout = Layout.packed(lengths)
    (out,) = model(xs, t, y, pos, layout)
    (no_y,) = model(xs, t, None, pos, layout)
    (other_t,) = model(xs, 1 - t, y, pos, layout)
    assert not torch.allclose(out, no_y, atol=1e-4) and not torch.allclose(out, other_t, atol=1e-4)


def test_at_init_output_is_the_final_layernorm_of_the_input() -> None:
    """adaLN-Zero everywhere: blocks are the identity, the final adaLN adds nothing."""
    model = MMDiT(MMDiTConfig(**SMALL))
    xs = [torch.randn(2, 5, 32), torch.randn(2, 3, 32)]
    (out,) = model(xs, torch.rand(2), torch.randn(2, 32), [torch.randint(0, 4, (2, 5, 2)), None])
    torch.testing.assert_close(out, nn.functional.layer_norm(xs[0], (32,), eps=1e-6))


# ---------------------------------------------------------------- packed == per sample


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_packed_equals_per_sample_regular(streams: int) -> None:
    model = _model(streams, out_streams=min(2, streams)).double().eval()
    lengths = [[4, 7, 2], [3, 1, 5], [2, 0, 3]][:streams]
    xs, t, y, pos = _inputs(lengths, 32, 2, dtype=torch.float64)
    packed = model(xs, t, y, pos, Layout.packed(lengths))

    for i in range(len(t)):
        xi = [x.split(lens, 1)[i] for x, lens in zip(xs, lengths)]
        pi = [None if p is None else p.split(lens, 1)[i] for p, lens in zip(pos, lengths)]
        ref = model(xi, t[i : i + 1], y[i : i + 1], pi)
        for out, r, lens in zip(packed, ref, lengths):
            torch.testing.assert_close(out.split(lens, 1)[i], r, rtol=1e-9, atol=1e-9)


def test_regular_batch_equals_per_sample() -> None:
    """Samples of a regular batch do not interact (per-sample t, y, and positions)."""
    model = _model(2).double().eval()
    xs = [torch.randn(3, 6, 32, dtype=torch.float64), torch.randn(3, 2, 32, dtype=torch.float64)]
    t, y = torch.rand(3, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    pos = [torch.randint(0, 8, (3, 6, 2)), None]
    (out,) = model(xs, t, y, pos)
    for i in range(3):
        (ref,) = model([x[i : i + 1] for x in xs], t[i : i + 1], y[i : i + 1], [pos[0][i : i + 1], None])
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- checkpointing, gradients


@pytest.mark.parametrize("packed", [False, True])
def test_checkpointing_gives_same_output_and_grads(packed: bool) -> None:
    plain = _model(2).double().train()
    ckpt = _model(2, checkpointing=True).double().train()
    ckpt.load_state_dict(plain.state_dict())
    lengths = [[3, 5], [2, 4]]
    xs, t, y, pos = _inputs(lengths, 32, 2, dtype=torch.float64)
    layout = Layout.packed(lengths) if packed else None
    if not packed:
        xs = [x.reshape(2, -1, 32) for x in xs]
        pos = [pos[0].reshape(2, -1, 2), None]

    calls = {id(plain): 0, id(ckpt): 0}
    for model in (plain, ckpt):  # count forward runs of one block (forward hooks do not fire on recompute)
        block = model.single[0]

        def counted(*args, _key=id(model), _forward=block.forward):
            calls[_key] += 1
            return _forward(*args)

        block.forward = counted

    outs, grads = [], []
    for model in (plain, ckpt):
        model.zero_grad()
        xs_in = [x.clone().requires_grad_() for x in xs]
        (out,) = model(xs_in, t, y, pos, layout)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()] + [x.grad for x in xs_in])
    assert calls == {id(plain): 1, id(ckpt): 2}  # checkpointing really recomputed the block in backward
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-10)


def test_gradient_reaches_every_parameter() -> None:
    model = _model(3, out_streams=1).train()
    lengths = [[4, 3], [2, 2], [3, 1]]
    xs, t, y, pos = _inputs(lengths, 32, 2)
    (out,) = model(xs, t, y, pos, Layout.packed(lengths))
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


# ---------------------------------------------------------------- config, inputs, accounting


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(dim=30, heads=4), "heads"),
        (dict(dim=12, heads=4), "heads"),  # head dim 3 is odd
        (dict(dim=32, heads=4, rope_axes=5), "rope_axes"),  # head dim 8 gives 4 pairs
        (dict(streams=0, out_streams=0), "streams"),
        (dict(streams=2, out_streams=3), "out_streams"),
        (dict(attn_backend="flash"), "attn_backend"),
        (dict(depth_dual=-1), "depth_dual"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_config_errors_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"MMDiTConfig\.{field}="):
        MMDiTConfig(**kw)


def test_config_derived_values() -> None:
    cfg = MMDiTConfig(dim=96, heads=4, rope_axes=3)
    assert cfg.head_dim == 24 and cfg.axes_dims == [8, 8, 8] and cfg.mlp_hidden == 384


def test_wrong_inputs_are_rejected() -> None:
    model = _model(2)
    xs = [torch.randn(2, 4, 32), torch.randn(2, 3, 32)]
    with pytest.raises(ValueError, match="2 streams"):
        model(xs[:1], torch.rand(2), None, [None])
    with pytest.raises(ValueError, match="t has shape"):
        model(xs, torch.rand(3), None, [None, None])
    with pytest.raises(ValueError, match=r"pos\[0\]"):
        model(xs, torch.rand(2), None, [torch.zeros(2, 4, 3), None])


def test_flops_per_token_matches_the_linears() -> None:
    """Matmul part = 2 x (weights one token passes through); attention part = 4 L C per block."""
    model = MMDiT(MMDiTConfig(**{**SMALL, "streams": 2}))
    per_token_weights = sum(
        m.weight.numel()
        for blk in model.dual
        for name, m in blk.streams[0].named_modules()
        if isinstance(m, nn.Linear) and name != "mod"
    ) + sum(
        m.weight.numel() for blk in model.single for name, m in blk.named_modules() if isinstance(m, nn.Linear) and name != "mod"
    )
    assert model.flops_per_token(0) == 2 * per_token_weights
    depth = model.cfg.depth_dual + model.cfg.depth_single
    assert model.flops_per_token(100) - model.flops_per_token(0) == depth * 4 * 100 * 32
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_an_mmdit_built_alone_needs_its_stream_counts_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"MMDiTConfig.streams, out_streams, rope_axes unset"):
        MMDiT(MMDiTConfig(dim=32, heads=2))
