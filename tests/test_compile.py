"""MMDiTConfig.compile: per-block torch.compile (fullgraph) that keeps checkpoints and results unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.backbone import MMDiT, MMDiTConfig
from models.blocks import DualStreamBlock, SingleStreamBlock
from models.packing import Layout
from models.rope import rope_cos_sin

C = 32


def test_blocks_compile_as_one_graph_on_regular_and_packed_batches() -> None:
    """fullgraph=True makes a graph break an error: both block kinds trace whole, regular and packed, and
    a second packed batch of other lengths runs too. The "eager" backend traces with dynamo but skips
    inductor's code generation, so this runs in seconds on a CPU."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dual, single = DualStreamBlock(C, 4, n_streams=2), SingleStreamBlock(C, 4)
    with torch.no_grad():  # non-zero adaLN, else both blocks are the identity
        for name, p in [*dual.named_parameters(), *single.named_parameters()]:
            if name.split(".")[-2] == "mod":
                p.normal_(std=0.2)
    dual_c, single_c = (torch.compile(b, fullgraph=True, dynamic=True, backend="eager") for b in (dual, single))
    batches = [(Layout(), [torch.randn(2, 6, C), torch.randn(2, 3, C)], torch.randint(0, 8, (2, 6, 2)))]
    for lengths in ([[3, 5], [2, 2]], [[4, 1, 6], [2, 2, 2]]):
        xs = [torch.randn(1, sum(lens), C) for lens in lengths]
        batches.append((Layout.packed(lengths), xs, torch.randint(0, 8, (1, sum(lengths[0]), 2))))
    for layout, xs, pos in batches:
        c = torch.randn(layout.num_samples() if layout.is_packed else xs[0].shape[0], C)
        x = layout.join(xs)  # the single-stream block's joined sequence, positioned too
        joined_rope = rope_cos_sin(torch.randint(0, 8, (*x.shape[:2], 2)), [4, 4])
        dual_args = (xs, c, [rope_cos_sin(pos, [4, 4]), None], layout)
        torch.testing.assert_close(dual_c(*dual_args), dual(*dual_args))
        torch.testing.assert_close(single_c(x, c, joined_rope, layout), single(x, c, joined_rope, layout))


@pytest.mark.slow  # inductor compiles for ~100 s on the 2-core CI machine
def test_compiled_blocks_match_eager_and_keep_state_dict_keys() -> None:
    cfg = MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1, attn_backend="sdpa", streams=2, out_streams=1,
                      rope_axes=2)
    torch.manual_seed(0)
    eager = MMDiT(cfg)
    compiled = MMDiT(dataclasses.replace(cfg, compile=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    compiled.load_state_dict(eager.state_dict())
    for lens in ([5, 9], [12, 3, 7]):  # two packed batches of different lengths
        s = len(lens)
        layout = Layout.packed([lens, [4] * s])
        x, c = torch.randn(1, sum(lens), 32), torch.randn(1, 4 * s, 32)
        pos = torch.randint(0, 8, (1, sum(lens), 2)).float()
        t = torch.rand(s)
        want = eager([x, c], t, None, [pos, None], layout)[0]
        got = compiled([x, c], t, None, [pos, None], layout)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
