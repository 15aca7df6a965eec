"""MMDiTConfig.compile: per-block torch.compile that keeps checkpoints and results unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.backbone import MMDiT, MMDiTConfig
from models.packing import Layout


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
