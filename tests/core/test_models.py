"""Backbones, stage features, teacher loading (incl. the original Swin release layout), SimMIM pieces."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gfm_core.config import StudentCfg, TeacherCfg
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.models.backbones import (
    FrozenTeacher,
    create_student,
    create_teacher,
    feature_dim,
    set_fused_attention,
    stage_features,
    stage_map,
    teacher_inputs,
)
from gfm_core.models.simmim import MaskedSwin, PixelShuffleDecoder, make_projector, swin_timm_kwargs

SWIN = "swin_tiny_patch4_window7_224"
# 64 px, patch 4: stage grids 16/8/4/2, window 4 divides all (the 2x2 stage clamps its window to 2)
TINY = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
STUDENT = StudentCfg(
    arch=SWIN, img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)
)


def _tiny_swin(**kw):
    torch.manual_seed(0)
    return timm.create_model(SWIN, pretrained=False, num_classes=0, **{**TINY, **kw}).eval()


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _to_original_swin_layout(model, num_classes=21841):
    """timm Swin state dict -> the original Swin release checkpoint ({"model": ...}, merges at stage ends)."""
    sd = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        sd[k] = v.clone()
    for name, buf in model.named_buffers():  # the release files carry these non-persistent buffers
        if name.endswith(("relative_position_index", "attn_mask")):
            sd[name] = buf.clone()
    sd["head.weight"] = torch.randn(num_classes, model.num_features) * 0.02
    sd["head.bias"] = torch.zeros(num_classes)
    return {"model": sd}


def test_create_student_is_headless_random_swin():
    model = create_student(STUDENT)
    assert isinstance(model, timm.models.swin_transformer.SwinTransformer)
    assert model.num_classes == 0
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    with pytest.raises(ConfigError, match=r"student\.arch"):
        create_student(StudentCfg(arch="no_such_model_xyz"))


def test_swin_stage_includes_the_following_patch_merge():
    model = _tiny_swin()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        s3 = stage_map(model, x, 3)
        s4 = stage_map(model, x, 4)
        merged = model.layers[3].downsample(inter[2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert inter[2].shape == (2, 64, 4, 4)  # timm's index 2 is *before* the merge
    assert s3.shape == (2, 128, 2, 2)
    torch.testing.assert_close(s3, merged, rtol=0, atol=0)
    torch.testing.assert_close(s4, inter[3], rtol=0, atol=0)  # the last stage has no merge after it
    feats = stage_features(model, x, 3)
    torch.testing.assert_close(feats, s3.mean((2, 3)))
    assert feature_dim(model, 3, 64) == 128 and feature_dim(model, 1, 64) == 32
    assert not model.training
    with pytest.raises(ConfigError, match="out of range"):
        stage_map(model, x, 5)


def test_create_teacher_is_frozen_and_matches_its_source(tmp_path):
    src = _tiny_swin(img_size=96, window_size=3)
    ckpt = _save(src, tmp_path / "teacher.safetensors")
    teacher = create_teacher(
        TeacherCfg(arch=SWIN, checkpoint=ckpt, img_size=96, feature_stage=3),
        window_size=3,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 1, 2, 2),
    )
    assert isinstance(teacher, FrozenTeacher)
    assert teacher.input_size == (96, 96) and teacher.feature_dim == 128
    assert teacher.mean == pytest.approx((0.485, 0.456, 0.406))
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.randn(2, 3, 96, 96, requires_grad=True)
    out = teacher(x)
    assert out.shape == (2, 128) and out.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(out, stage_features(src, x, 3), rtol=0, atol=0)
        assert stage_map(teacher.model, x, 3).shape == (2, 128, 3, 3)


@pytest.mark.parametrize("stage", [2, 3, 4])
def test_dropping_the_teachers_unused_stages_keeps_its_features(tmp_path, stage):
    ckpt = _save(_tiny_swin(img_size=96, window_size=3), tmp_path / "teacher.safetensors")
    cfg = TeacherCfg(arch=SWIN, checkpoint=ckpt, img_size=96, feature_stage=stage)
    teacher = create_teacher(cfg, window_size=3, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
    x = torch.randn(2, 3, 96, 96)
    whole = teacher(x)
    total = sum(p.numel() for p in teacher.parameters())
    dropped = teacher.drop_unused_()
    assert 0 < dropped < total and len(teacher.model.layers) == min(stage + 1, 4)
    assert sum(p.numel() for p in teacher.parameters()) == total - dropped
    torch.testing.assert_close(teacher(x), whole, rtol=0, atol=0)


def test_original_swin_release_layout_loads_exactly(tmp_path):
    src = _tiny_swin()
    ckpt = tmp_path / "swin_tiny_22k.pth"
    original = _to_original_swin_layout(src)
    assert "layers.0.downsample.reduction.weight" in original["model"]
    assert "layers.3.downsample.reduction.weight" not in original["model"]
    assert any(k.endswith("attn_mask") for k in original["model"])
    torch.save(original, ckpt)
    teacher = create_teacher(
        TeacherCfg(arch=SWIN, checkpoint=ckpt, img_size=64, feature_stage=3),
        window_size=4,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 1, 2, 2),
    )
    loaded = teacher.model.state_dict()
    for key, value in src.state_dict().items():
        assert torch.equal(loaded[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), stage_features(src, x, 3), rtol=0, atol=0)


def test_teacher_config_and_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="a local weight file is required; nothing is downloaded"):
        create_teacher(TeacherCfg(arch=SWIN, checkpoint=None))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(str(missing)) + ".*not found"):
        create_teacher(TeacherCfg(arch=SWIN, checkpoint=missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        create_teacher(
            TeacherCfg(arch=SWIN, checkpoint=garbage, img_size=64),
            **{k: v for k, v in TINY.items() if k != "img_size"},
        )
    with pytest.raises(ConfigError, match=r"teacher\.arch"):
        create_teacher(TeacherCfg(arch="no_such_model_xyz", checkpoint=garbage))


def test_mismatching_teacher_weights_are_not_silently_partial(tmp_path):
    # timm only *logs* missing keys when num_classes differs from the file's: create_teacher must raise
    ckpt = _save(_tiny_swin(depths=(2, 2, 1, 2)), tmp_path / "shallow.safetensors")
    with pytest.raises(CheckpointError, match="missing key"):
        create_teacher(
            TeacherCfg(arch=SWIN, checkpoint=ckpt, img_size=64),
            window_size=4,
            embed_dim=16,
            depths=(2, 2, 2, 2),
            num_heads=(1, 1, 2, 2),
        )
    extra = {k: v.contiguous() for k, v in _tiny_swin().state_dict().items()}
    extra["decoder.conv.weight"] = torch.zeros(3, 3)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected key.*decoder\.conv\.weight"):
        create_teacher(
            TeacherCfg(arch=SWIN, checkpoint=tmp_path / "extra.safetensors", img_size=64),
            window_size=4,
            embed_dim=16,
            depths=(2, 2, 2, 2),
            num_heads=(1, 1, 2, 2),
        )
    ckpt = _save(_tiny_swin(depths=(2, 2, 3, 2)), tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match=r"deep\.safetensors"):
        create_teacher(
            TeacherCfg(arch=SWIN, checkpoint=ckpt, img_size=64),
            window_size=4,
            embed_dim=16,
            depths=(2, 2, 2, 2),
            num_heads=(1, 1, 2, 2),
        )


def test_efficientnet_teacher_through_forward_intermediates(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    ckpt = _save(src, tmp_path / "lite0.safetensors")
    teacher = create_teacher(
        TeacherCfg(arch="tf_efficientnet_lite0", checkpoint=ckpt, img_size=64, feature_stage=4)
    )
    assert teacher.input_size == (64, 64)  # CNNs take no img_size kwarg: it only sets the resize target
    assert teacher.mean == pytest.approx((0.5, 0.5, 0.5)) and teacher.std == pytest.approx((0.5, 0.5, 0.5))
    assert teacher.feature_dim == 112
    teacher.train()
    assert not any(m.training for m in teacher.modules())  # BatchNorm statistics stay frozen
    x = torch.randn(2, 3, 64, 64)
    out = teacher(x)
    assert out.shape == (2, 112)
    with torch.no_grad():
        torch.testing.assert_close(out, stage_features(src, x, 4), rtol=0, atol=0)
        assert stage_map(src, x, 4).shape == (2, 112, 4, 4)


def test_teacher_inputs_resize_and_renormalise():
    s_mean, s_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t_mean, t_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    raw = torch.rand(2, 3, 64, 64)
    x = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    out = teacher_inputs(x, (96, 96), src_mean=s_mean, src_std=s_std, dst_mean=t_mean, dst_std=t_std)
    expected = (F.interpolate(raw, (96, 96), mode="bilinear", align_corners=True) - 0.5) / 0.5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    same = teacher_inputs(x, (64, 64), src_mean=s_mean, src_std=s_std, dst_mean=s_mean, dst_std=s_std)
    assert torch.equal(same, x)
    resized = teacher_inputs(x, (96, 96), src_mean=s_mean, src_std=s_std, dst_mean=s_mean, dst_std=s_std)
    torch.testing.assert_close(resized, F.interpolate(x, (96, 96), mode="bilinear", align_corners=True))
    with pytest.raises(ConfigError, match="same bands"):
        teacher_inputs(x[:, :2], (96, 96), src_mean=s_mean, src_std=s_std, dst_mean=t_mean, dst_std=t_std)


def test_masked_swin_matches_timm_without_mask_and_hides_masked_tokens():
    enc = _tiny_swin()
    student = MaskedSwin(enc, arch=SWIN)
    assert student.mask_token.shape == (1, 1, 1, 16)
    assert 0 < float(student.mask_token.detach().abs().max()) < 0.1
    assert student.grid_size == (16, 16) and student.patch_size == 4 and student.out_stride == 32
    assert student.stage_dim == 128 and student.num_features == 128
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feat, final = student(x, None)
        feat0, final0 = student(x, torch.zeros(2, 16, 16, dtype=torch.bool))
        ref_final = enc.forward_features(x).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, stage_features(enc, x, 3), rtol=0, atol=0)
        torch.testing.assert_close(final, ref_final, rtol=0, atol=0)
        torch.testing.assert_close(feat0, feat, rtol=0, atol=0)
        torch.testing.assert_close(final0, final, rtol=0, atol=0)
        assert final.shape == (2, 128, 2, 2)
        full = torch.ones(2, 16, 16, dtype=torch.bool)
        fa, ma = student(x, full)
        fb, mb = student(torch.randn(2, 3, 64, 64), full)
        torch.testing.assert_close(fa, fb)  # every token replaced: the input no longer matters
        torch.testing.assert_close(ma, mb)
        half = torch.zeros(2, 16, 16, dtype=torch.bool)
        half[:, :8] = True
        assert not torch.allclose(student(x, half)[0], feat)
    with pytest.raises(ValueError, match="token grid"):
        student(x, torch.zeros(2, 48, 48, dtype=torch.bool))


def test_masked_swin_records_rebuild_kwargs_and_rejects_non_swin():
    enc = _tiny_swin()
    kwargs = swin_timm_kwargs(enc)
    assert kwargs == dict(
        img_size=64,
        patch_size=4,
        in_chans=3,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 1, 2, 2),
        window_size=4,
        num_classes=0,
    )
    assert MaskedSwin(enc).arch == SWIN
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="SwinTransformer"):
        MaskedSwin(cnn)
    with pytest.raises(ConfigError, match="out of range"):
        MaskedSwin(enc, feature_stage=5)


def test_masked_swin_grad_checkpointing_gives_the_same_output():
    enc = _tiny_swin()
    student = MaskedSwin(enc)
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, 4:12, 4:12] = True
    a = student(x, mask)
    enc.set_grad_checkpointing(True)
    b = student(x, mask)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_decoder_and_projector_shapes():
    dec = PixelShuffleDecoder(128, 32, 3)
    assert dec(torch.randn(2, 128, 2, 2)).shape == (2, 3, 64, 64)
    assert dec.conv.out_channels == 32 * 32 * 3 and dec.conv.kernel_size == (1, 1)
    assert PixelShuffleDecoder(64, 4, out_chans=4)(torch.randn(1, 64, 3, 5)).shape == (1, 4, 12, 20)
    proj = make_projector(128, 112)
    assert proj(torch.randn(3, 128)).shape == (3, 112)


def test_unknown_teacher_kwargs_are_config_errors(tmp_path):
    ckpt = _save(_tiny_swin(), tmp_path / "t.safetensors")
    with pytest.raises(ConfigError, match="rejects its arguments"):
        create_teacher(TeacherCfg(arch=SWIN, checkpoint=ckpt, img_size=64), no_such_kwarg=1)


@pytest.mark.parametrize("arch", [SWIN, "tf_efficientnet_lite0"])
def test_low_precision_teacher_gives_the_autocast_features_bit_for_bit(tmp_path, arch):
    torch.manual_seed(0)
    if arch == SWIN:
        kw = dict(window_size=3, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
        src = timm.create_model(SWIN, pretrained=False, num_classes=0, img_size=96, **kw)
    else:
        kw = {}
        src = timm.create_model(arch, pretrained=False, num_classes=0)
    ckpt = _save(src, tmp_path / "teacher.safetensors")
    cfg = TeacherCfg(arch=arch, checkpoint=ckpt, img_size=96, feature_stage=3)
    ref, low = create_teacher(cfg, **kw), create_teacher(cfg, **kw)
    assert low.lower_precision_(torch.bfloat16) is low and low.compute_dtype == torch.bfloat16
    for module in low.modules():
        if type(module) in (torch.nn.Linear, torch.nn.Conv2d):
            assert module.weight.dtype == torch.bfloat16
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            assert module.weight.dtype == torch.float32  # autocast runs norms on float32 weights
    assert all(not p.requires_grad for p in low.parameters())
    assert low.feature_dim == ref.feature_dim
    x = torch.randn(2, 3, 96, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x)
        assert torch.equal(low(x), expected)
    assert torch.equal(low(x), expected)  # it enters autocast itself when the caller has not


def test_fused_attention_switch_computes_the_same_function():
    model = _tiny_swin()
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model.forward_features(x)
        out.square().mean().backward()
        table = model.layers[0].blocks[1].attn.relative_position_bias_table  # shifted window: mask + bias
        return out.detach(), table.grad.clone()

    assert not any(getattr(m, "fused_attn", False) for m in model.modules())  # timm's default for Swin
    out_ref, grad_ref = run()
    assert set_fused_attention(model) == sum(len(layer.blocks) for layer in model.layers)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    out, grad = run()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    assert set_fused_attention(model, enabled=False) == 8 and not model.layers[0].blocks[0].attn.fused_attn
