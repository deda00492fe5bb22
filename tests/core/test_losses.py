import math

import pytest
import torch

from gfm_core.losses import gfm_loss, masked_l1, neg_cosine


def _example():
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, -4.0]]]])  # [1, 2, 2, 2]
    pred = torch.zeros_like(target)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # [1, 1, 2, 2]: pixels (0,0) and (1,1)
    return pred, target, mask


def test_masked_l1_by_hand():
    pred, target, mask = _example()
    # masked |diff|: channel 0 -> 1 + 4, channel 1 -> 1 + 4 = 10; 2 masked pixels, 2 channels
    expected = 10 / (2 + 1e-5) / 2
    assert masked_l1(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_l1(pred, target, mask[:, 0]).item() == pytest.approx(expected, rel=1e-6)
    assert masked_l1(pred, target, mask.bool()).item() == pytest.approx(expected, rel=1e-6)


def test_masked_l1_ignores_unmasked_pixels_and_handles_empty_masks():
    pred, target, mask = _example()
    base = masked_l1(pred, target, mask)
    pred2 = pred.clone()
    pred2[..., 0, 1] = 100.0  # an unmasked pixel
    assert torch.equal(masked_l1(pred2, target, mask), base)
    assert masked_l1(pred, target, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        masked_l1(pred[:, :1], target, mask)


def test_neg_cosine_values():
    x = torch.randn(5, 16)
    assert neg_cosine(x, x).item() == pytest.approx(-1.0, abs=1e-6)
    assert neg_cosine(x, -x).item() == pytest.approx(1.0, abs=1e-6)
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert neg_cosine(s, t).item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2, rel=1e-6)
    assert neg_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(0.0)


def test_neg_cosine_detaches_the_teacher():
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8, requires_grad=True)
    neg_cosine(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    with pytest.raises(ValueError, match="projector"):
        neg_cosine(torch.randn(2, 4), torch.randn(2, 5))


def test_gfm_loss_combines_named_parts():
    pred, target, mask = _example()
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    out = gfm_loss(pred, target, mask, s, t, w_mim=0.5, alpha=2.0)
    assert set(out) == {"loss", "mim", "distill"}
    assert out["mim"] == masked_l1(pred, target, mask)
    assert out["distill"] == neg_cosine(s, t)
    assert out["loss"].item() == pytest.approx(
        0.5 * out["mim"].item() + 2.0 * out["distill"].item(), rel=1e-6
    )


def test_gfm_loss_without_teacher_is_exact_zero_but_keeps_the_graph():
    pred, target, mask = _example()
    s = torch.randn(2, 4, requires_grad=True)
    out = gfm_loss(pred, target, mask, s, None, w_mim=1.0, alpha=0.0)
    assert out["distill"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["mim"].item())
    out["loss"].backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


def test_losses_are_float32_under_bf16_autocast():
    pred, target, mask = _example()
    s = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mim = masked_l1(pred.bfloat16(), target.bfloat16(), mask)
        cos = neg_cosine(s, s)
    assert mim.dtype == torch.float32 and cos.dtype == torch.float32
    assert mim.item() == pytest.approx(10 / (2 + 1e-5) / 2, rel=1e-6)
    assert cos.item() == pytest.approx(-1.0, abs=1e-6)
