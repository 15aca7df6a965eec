"""The shared generator: shapes, the training step, CFG sampling, the non-finite guard."""

from __future__ import annotations

import pytest
import torch

from models.backbone import MMDiTConfig
from models.conditioning import ByteText, ClassLabel
from models.flow import Euler
from models.generators import ImageFlow, OptimConfig
from models.tokenizers.image import ImagePatches
from tests.conftest import velocity


def tiny(conditioning=ClassLabel(num_classes=3), **kw) -> ImageFlow:
    torch.manual_seed(0)
    return ImageFlow(tokenizer=ImagePatches(3, 8, 2), conditioning=conditioning,
                     backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1), sampler=Euler(steps=4), **kw)


def batch(n: int = 4) -> dict:
    return {"x": torch.rand(n, 3, 8, 8) * 2 - 1, "cls": torch.tensor([0, 1, 2, 0][:n]), "txt": ["a red circle"] * n}


def test_patch_roundtrip() -> None:
    tok = ImagePatches(3, 8, 2)
    x = torch.randn(2, 3, 8, 8)
    tokens, pos = tok.tokenize(x)
    assert tokens.shape == (2, 16, 12) and pos.shape == (2, 16, 2)
    assert torch.equal(tok.untokenize(tokens, tuple(x.shape)), x)
    assert pos[0, 5].tolist() == [1.0, 1.0]  # row 1, col 1 of a 4x4 patch grid


def test_velocity_is_zero_at_init_and_loss_is_finite() -> None:
    m = tiny()
    b = batch()
    v = velocity(m, b["x"], torch.rand(4), m.conditions(b), torch.zeros(4, dtype=torch.bool))
    assert v.shape == b["x"].shape and torch.count_nonzero(v) == 0  # zero-init output projection
    loss = m.loss(b)
    assert torch.isfinite(loss) and loss.item() > 0.5  # E|eps - x0|^2 ~ 1 + E x0^2


def test_text_conditioning_and_cfg_generation_shapes() -> None:
    m = tiny(conditioning=ByteText(max_len=16, layers=1, heads=2))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = m.generate({"txt": ["a", "b"]}, 2, cfg_scale=3.0, seed=1)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    y = m.generate({"txt": ["a", "b"]}, 2, cfg_scale=3.0, seed=1)
    assert torch.equal(x, y)  # seeded sampling is reproducible
    z = m.generate({"txt": ["a", "b"]}, 2, cfg_scale=1.0, seed=1)
    assert not torch.allclose(x, z)  # guidance changes the result


def test_bad_class_label_is_a_clear_error() -> None:
    """Checked on the host: as a batch moves to the device (fit, validate) and once per sampling run;
    label 3 of a 3-class model would otherwise be the null class. The fit path: tests/test_host_syncs.py."""
    m = tiny()
    b = batch()
    for label in (7, 3, -1):
        b["cls"] = torch.tensor([0, 1, label, 0])
        with pytest.raises(ValueError, match=rf"class label {label} outside 0\.\.2 .*num_classes"):
            m.transfer_batch_to_device(b, torch.device("cpu"), 0)
    with pytest.raises(ValueError, match=r"class label 7 outside 0\.\.2"):
        m.generate({"cls": [7, 0]}, 2, steps=1)
    assert m.transfer_batch_to_device(batch(), torch.device("cpu"), 0)["cls"].tolist() == [0, 1, 2, 0]


def test_backbone_stream_count_checked() -> None:
    try:
        ImageFlow(backbone=MMDiTConfig(dim=32, heads=2, streams=3))
    except ValueError as e:
        assert "model.backbone.streams=3" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_training_reduces_loss_on_a_fixed_batch() -> None:
    m = tiny(optim=OptimConfig(lr=3e-3))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    b = batch()
    torch.manual_seed(0)
    first = sum(m.loss(b).item() for _ in range(8)) / 8
    for _ in range(150):
        opt.zero_grad()
        m.loss(b).backward()
        opt.step()
    torch.manual_seed(0)
    last = sum(m.loss(b).item() for _ in range(8)) / 8
    assert last < 0.8 * first, (first, last)


def perturbed(m: ImageFlow) -> ImageFlow:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_packed_mixed_sizes_match_each_sample_alone() -> None:
    """A list of differently sized images is packed (block-diagonal attention): each sample's
    velocity equals the one computed for it alone, so no sample sees another."""
    torch.manual_seed(0)
    m = perturbed(tiny())
    xs = [torch.randn(3, 8, 8), torch.randn(3, 4, 12), torch.randn(3, 6, 2)]
    t = torch.tensor([0.2, 0.5, 0.9])
    cond = {"cls": torch.tensor([0, 1, 2])}
    keep = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        packed = velocity(m, xs, t, cond, keep)
        alone = [velocity(m, x[None], t[i : i + 1], {"cls": cond["cls"][i : i + 1]}, keep[:1])[0]
                 for i, x in enumerate(xs)]
    assert [v.shape for v in packed] == [x.shape for x in xs]
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_packed_loss_weighs_samples_like_a_regular_batch() -> None:
    """Same-sized samples given as a list take the regular path; a packed batch's loss is the
    mean of per-sample means (a long sample does not outweigh a short one)."""
    from models.packing import Layout
    from models.tokens import per_sample_mse

    pred, target = torch.zeros(1, 5, 2), torch.ones(1, 5, 2)
    target[0, :1] = 3.0  # sample 0: 1 token, error 9; sample 1: 4 tokens, error 1
    torch.testing.assert_close(per_sample_mse(pred, target, Layout.packed([[1, 4]])), torch.tensor([9.0, 1.0]))
    m = tiny()
    b = batch()
    torch.manual_seed(1)
    regular = m.loss(b)
    torch.manual_seed(1)
    listed = m.loss({**b, "x": list(b["x"])})
    torch.testing.assert_close(regular, listed)
    mixed = {**b, "x": [torch.rand(3, 8, 8), torch.rand(3, 4, 8), torch.rand(3, 8, 4), torch.rand(3, 2, 2)]}
    loss = m.loss(mixed)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.backbone.parameters())
    assert m.last_lengths == [16 + 1, 8 + 1, 8 + 1, 1 + 1]  # image tokens + one class token each
