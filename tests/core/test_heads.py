"""Task heads over real tiny timm backbones: shapes, gradients, the registry, the feature adapter."""

from __future__ import annotations

import pytest
import timm
import torch

from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.models.heads import FeatureAdapter, build_task_model, head_class
from gfm_core.task_heads import HEADS
from gfm_core.training.optim import layer_decay_fn

SIZE = 32
TINY_SWIN = dict(img_size=SIZE, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


def _backbone(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "swin":
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **TINY_SWIN)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


def _outputs(task: str) -> int:
    return {"classification": 5, "multilabel": 7, "segmentation": 4, "change": 2, "superres": 3}[task]


def _input(task: str, b: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (b, 2, 3, SIZE, SIZE) if task == "change" else (b, 3, SIZE, SIZE)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("backbone", ["swin", "efficientnet"])
@pytest.mark.parametrize("task", sorted(HEADS))
def test_head_output_shapes_and_gradients(task, backbone):
    model = build_task_model(task, _backbone(backbone), num_outputs=_outputs(task), decoder_dim=16)
    x = _input(task)
    out = model(x)
    k = _outputs(task)
    expected = {
        "classification": (2, k),
        "multilabel": (2, k),
        "segmentation": (2, k, SIZE, SIZE),
        "change": (2, 2, SIZE, SIZE),
        "superres": (2, 3, SIZE, SIZE),
    }[task]
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient (unused, would break DDP): {no_grad[:5]}"


def test_unknown_task_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        head_class("detection")
    msg = str(err.value)
    assert "'detection'" in msg
    for name in HEADS:
        assert name in msg
    with pytest.raises(ConfigError, match="valid: change, classification"):
        build_task_model("detection", _backbone("swin"), num_outputs=2)


def test_change_model_rejects_single_images_and_band_mismatch():
    model = build_task_model("change", _backbone("swin"), num_outputs=2, decoder_dim=8)
    with pytest.raises(DataValidationError, match=r"expected an image pair \[B, 2, C, H, W\]"):
        model(torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(DataValidationError, match="4 bands, the backbone 3"):
        model(torch.randn(2, 2, 4, SIZE, SIZE))
    with pytest.raises(ConfigError, match="num_outputs must be 2"):
        build_task_model("change", _backbone("swin"), num_outputs=3)


def test_change_head_is_siamese_with_shared_weights():
    model = build_task_model("change", _backbone("swin"), num_outputs=2, decoder_dim=8).eval()
    x = _input("change")
    same = torch.stack([x[:, 0], x[:, 0]], dim=1)
    swapped = x.flip(1)
    with torch.no_grad():
        # |f(A) - f(B)| is symmetric in the dates, and one backbone encodes both
        torch.testing.assert_close(model(x), model(swapped))
        assert not torch.allclose(model(x), model(same))
    assert sum(1 for m in model.modules() if isinstance(m, timm.models.swin_transformer.SwinTransformer)) == 1


def test_feature_adapter_swin_is_nchw_stage_outputs():
    swin = _backbone("swin").eval()
    adapter = FeatureAdapter(swin)
    assert adapter.channels == [16, 32, 64, 128] and adapter.reductions == [4, 8, 16, 32]
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = adapter(x)
        t = swin.patch_embed(x)  # NHWC inside timm's Swin
        for i, layer in enumerate(swin.layers):
            t = layer(t)
            ref = swin.norm(t) if i == len(swin.layers) - 1 else t
            torch.testing.assert_close(feats[i], ref.permute(0, 3, 1, 2))
    assert [f.shape[-1] for f in feats] == [8, 4, 2, 1]


def test_feature_adapter_efficientnet_drops_stride2_and_unused_head():
    adapter = FeatureAdapter(_backbone("efficientnet"))
    assert adapter.reductions == [4, 8, 16, 32] and adapter.channels == [24, 40, 112, 320]
    names = [n for n, _ in adapter.named_parameters()]
    assert not any(n.startswith(("model.conv_head", "model.classifier")) for n in names)


def test_feature_adapter_needs_timm_feature_api():
    with pytest.raises(ConfigError, match="forward_intermediates"):
        FeatureAdapter(torch.nn.Linear(3, 3))


def test_layer_decay_scales_backbone_depth_not_head():
    model = build_task_model("segmentation", _backbone("swin"), num_outputs=3, decoder_dim=8)
    fn = layer_decay_fn(model, 0.9, prefix="")
    assert fn("head.classifier.weight") == 1.0
    embed = fn("backbone.model.patch_embed.proj.weight")
    first = fn("backbone.model.layers.0.blocks.0.attn.qkv.weight")
    last = fn("backbone.model.layers.3.blocks.0.attn.qkv.weight")
    assert embed < first < last < 1.0
    assert last == pytest.approx(0.9)
    # the paper's ids (GFM/SimMIM get_swin_layer): patch_embed 0, block j j + 1, final norm sum(depths) + 1 = 5;
    # scale 0.9^(5 - id); a stage's patch merging shares the id of the block before it
    assert embed == pytest.approx(0.9**5) and first == pytest.approx(0.9**4)
    assert fn("backbone.model.layers.1.downsample.reduction.weight") == first
    assert fn("backbone.model.norm.weight") == 1.0
    assert layer_decay_fn(model, 1.0)("anything") == 1.0
