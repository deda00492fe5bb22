"""ContinualPretrain: paper geometry, frozen teacher, loss switches, export round trip."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gfm_core.config import PretrainCfg, StudentCfg, TeacherCfg
from gfm_core.data.pretrain.masking import MaskGenerator
from gfm_core.errors import ConfigError
from gfm_core.io import sha256_file
from gfm_core.models.backbones import create_student, create_teacher, stage_map, teacher_inputs
from gfm_core.models.simmim import MaskedSwin, PixelShuffleDecoder, make_projector
from gfm_core.models.weights import load_backbone
from gfm_core.objectives import ContinualPretrain, build_continual_pretrain, export_backbone

SWIN = "swin_tiny_patch4_window7_224"
STUDENT = StudentCfg(
    arch=SWIN, img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)
)
TEACHER_KW = dict(
    window_size=3, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)
)  # 96 px: 24/12/6/3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(b=2, size=64, patch=16, seed=0):
    gen = MaskGenerator(size, patch, 4, 0.6)
    rng = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, 3, size, size, generator=rng),
        "mask": torch.stack([gen(rng) for _ in range(b)]),
    }


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model(SWIN, pretrained=False, num_classes=0, img_size=96, **TEACHER_KW)
    path = tmp_path / "teacher.safetensors"
    save_file(src.state_dict(), str(path))
    return path


def _objective(teacher_file, *, w_mim=1.0, alpha=1.0, seed=0):
    torch.manual_seed(seed)
    student = MaskedSwin(create_student(STUDENT), arch=STUDENT.arch, timm_kwargs=STUDENT.timm_kwargs())
    teacher = create_teacher(TeacherCfg(arch=SWIN, checkpoint=teacher_file, img_size=96), **TEACHER_KW)
    return ContinualPretrain(
        student,
        PixelShuffleDecoder(student.num_features, student.out_stride, 3),
        make_projector(student.stage_dim, teacher.feature_dim),
        teacher,
        w_mim=w_mim,
        alpha=alpha,
        mean=MEAN,
        std=STD,
    )


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].detach().clone()))
    return calls


def _teacher_inputs_seen(teacher):
    """Images reaching the teacher's first conv (stage features bypass the timm model's own forward)."""
    return _count_calls(teacher.model.get_submodule(teacher.model.pretrained_cfg["first_conv"]))


def test_paper_geometry_swin_b_forward_backward(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
    ckpt = tmp_path / "swin_base_teacher.safetensors"
    save_file(src.state_dict(), str(ckpt))
    del src
    cfg = PretrainCfg(
        teacher=TeacherCfg(checkpoint=ckpt, img_size=224)
    )  # everything else: the paper's values
    obj = build_continual_pretrain(cfg)
    obj.train()
    assert obj.student.grid_size == (48, 48) and obj.student.stage_dim == 1024
    assert obj.teacher.input_size == (224, 224) and obj.teacher.feature_dim == 1024
    assert obj.projector.in_features == 1024 and obj.projector.out_features == 1024
    assert obj.decoder.conv.out_channels == 32 * 32 * 3
    batch = _batch(1, size=192, patch=32)
    assert int(batch["mask"].sum()) == 22 * 64
    with torch.no_grad():
        assert stage_map(obj.student.encoder, batch["image"], 3).shape == (1, 1024, 6, 6)
        t_in = obj.teacher.preprocess(batch["image"], obj.mean, obj.std)
        assert t_in.shape == (1, 3, 224, 224)
        assert stage_map(obj.teacher.model, t_in, 3).shape == (1, 1024, 7, 7)
    out = obj(batch)
    assert set(out) == {"loss", "mim", "distill", "cosine", "embed_std"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert obj.student.mask_token.grad is not None and obj.projector.weight.grad is not None
    assert all(p.grad is None for p in obj.teacher.parameters())


def test_teacher_stays_bit_identical_while_everything_else_learns(teacher_file):
    obj = _objective(teacher_file)
    teacher_before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in obj.student.state_dict().items()}
    obj.train()
    assert obj.student.training and not obj.teacher.training
    assert not any(m.training for m in obj.teacher.modules())
    # every parameter goes to AdamW, teacher included: freezing must hold without the loop's help
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3, weight_decay=0.05)
    batch = _batch(4)
    losses = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        out = obj(batch)
        out["loss"].backward()
        if step == 0:
            for name, mod in [
                ("student", obj.student),
                ("decoder", obj.decoder),
                ("projector", obj.projector),
            ]:
                grads = [p.grad for p in mod.parameters()]
                assert all(g is not None for g in grads), name
                assert sum(float(g.abs().sum()) for g in grads) > 0, name
            assert float(obj.student.mask_token.grad.abs().sum()) > 0
            assert all(p.grad is None for p in obj.teacher.parameters())
        opt.step()
        losses.append(out["loss"].item())
    for k, v in obj.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not torch.equal(obj.student.mask_token, student_before["mask_token"])
    assert losses[-1] < losses[0]


def test_teacher_sees_the_unmasked_image_resized_and_renormalised(teacher_file):
    obj = _objective(teacher_file)
    seen = _teacher_inputs_seen(obj.teacher)
    batch = _batch(2)
    obj(batch)
    obj({"image": batch["image"], "mask": torch.ones_like(batch["mask"])})
    assert len(seen) == 2
    assert seen[0].shape == (2, 3, 96, 96)
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    expected = teacher_inputs(
        batch["image"], (96, 96), src_mean=MEAN, src_std=STD, dst_mean=MEAN, dst_std=STD
    )
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(
        seen[0], F.interpolate(batch["image"], (96, 96), mode="bilinear", align_corners=True)
    )


def test_alpha_zero_skips_the_teacher(teacher_file):
    obj = _objective(teacher_file, alpha=0.0)
    calls = _count_calls(obj.teacher)
    out = obj(_batch())
    assert calls == []
    assert out["distill"].item() == 0.0 and out["cosine"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["mim"].item())
    out["loss"].backward()
    assert torch.equal(
        obj.projector.weight.grad, torch.zeros_like(obj.projector.weight)
    )  # in the graph, weight 0
    on = _objective(teacher_file, alpha=1.0)
    calls_on = _count_calls(on.teacher)
    on(_batch())
    assert len(calls_on) == 1


def test_w_mim_zero_is_distill_only(teacher_file):
    obj = _objective(teacher_file, w_mim=0.0, alpha=1.0)
    out = obj(_batch())
    assert out["mim"].item() > 0  # still computed for logging
    assert out["loss"].item() == pytest.approx(out["distill"].item())
    assert out["cosine"].item() == pytest.approx(-out["distill"].item())
    out["loss"].backward()
    assert torch.equal(obj.decoder.conv.weight.grad, torch.zeros_like(obj.decoder.conv.weight))
    assert float(obj.projector.weight.grad.abs().sum()) > 0


def test_loss_weights_combine_and_embed_std_is_reported(teacher_file):
    obj = _objective(teacher_file, w_mim=0.5, alpha=2.0)
    out = obj(_batch(4))
    assert out["loss"].item() == pytest.approx(
        0.5 * out["mim"].item() + 2.0 * out["distill"].item(), rel=1e-5
    )
    assert -1 <= out["cosine"].item() <= 1 and not out["cosine"].requires_grad
    assert 0 < out["embed_std"].item() < 1 and not out["embed_std"].requires_grad


def test_bad_objective_settings(teacher_file):
    obj = _objective(teacher_file)
    with pytest.raises(ConfigError, match="both 0"):
        ContinualPretrain(
            obj.student, obj.decoder, obj.projector, obj.teacher, w_mim=0, alpha=0, mean=MEAN, std=STD
        )
    with pytest.raises(ConfigError, match="needs a teacher"):
        ContinualPretrain(obj.student, obj.decoder, obj.projector, None, alpha=1.0, mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match="input channels"):
        ContinualPretrain(obj.student, obj.decoder, obj.projector, obj.teacher, mean=(0.5,), std=(0.5,))


def test_no_weight_decay_names(teacher_file):
    obj = _objective(teacher_file)
    nwd = obj.no_weight_decay_names()
    assert "student.mask_token" in nwd
    assert "student.encoder.layers.0.blocks.0.attn.relative_position_bias_table" in nwd
    assert "student.encoder.layers.0.blocks.0.attn.qkv.bias" in nwd
    assert "student.encoder.norm.weight" in nwd and "projector.bias" in nwd and "decoder.conv.bias" in nwd
    assert "student.encoder.layers.0.blocks.0.attn.qkv.weight" not in nwd
    assert "projector.weight" not in nwd and "decoder.conv.weight" not in nwd
    assert not any(n.startswith("teacher.") for n in nwd)


def test_build_mim_only_needs_no_teacher_file():
    cfg = PretrainCfg(student=STUDENT, mask_patch_size=16, alpha=0.0, teacher=TeacherCfg(checkpoint=None))
    obj = build_continual_pretrain(cfg)
    assert obj.teacher is None and obj.projector.out_features == obj.student.stage_dim
    out = obj(_batch())
    assert out["distill"].item() == 0.0
    with pytest.raises(ConfigError, match="a local weight file is required"):
        build_continual_pretrain(cfg.model_copy(update={"alpha": 1.0}))


def test_build_with_an_efficientnet_teacher(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    ckpt = tmp_path / "lite0.safetensors"
    save_file(src.state_dict(), str(ckpt))
    teacher = TeacherCfg(arch="tf_efficientnet_lite0", checkpoint=ckpt, img_size=96, feature_stage=4)
    obj = build_continual_pretrain(PretrainCfg(student=STUDENT, teacher=teacher, mask_patch_size=16))
    assert obj.projector.out_features == 112
    seen = _teacher_inputs_seen(obj.teacher)
    batch = _batch()
    out = obj(batch)
    raw = batch["image"] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    expected = (F.interpolate(raw, (96, 96), mode="bilinear", align_corners=True) - 0.5) / 0.5
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in obj.teacher.parameters())


def test_export_round_trips_through_timm(teacher_file, tmp_path):
    obj = _objective(teacher_file)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    out = obj(_batch())
    out["loss"].backward()
    opt.step()
    path = export_backbone(
        obj, tmp_path / "gfm_backbone.safetensors", meta={"teacher_sha256": sha256_file(teacher_file)}
    )
    keys = set(load_file(str(path)))
    assert keys == set(obj.student.encoder.state_dict()) and not any("mask_token" in k for k in keys)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["arch"] == SWIN and side["window_size"] == 4
    assert side["pretrained_cfg"]["input_size"] == [3, 64, 64] and side["pretrained_cfg"]["mean"] == list(
        MEAN
    )
    assert side["meta"]["teacher_sha256"] == sha256_file(teacher_file)
    assert side["weights_sha256"] == sha256_file(path)

    x = torch.randn(2, 3, 64, 64)
    obj.eval()
    with torch.no_grad():
        ref = obj.student.encoder.forward_features(x)
        plain = timm.create_model(
            side["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **side["timm_kwargs"]
        ).eval()
        torch.testing.assert_close(plain.forward_features(x), ref, rtol=0, atol=0)
        loaded = load_backbone(path).eval()
        torch.testing.assert_close(loaded.forward_features(x), ref, rtol=0, atol=0)
        assert loaded.pretrained_cfg["mean"] == MEAN
        head = load_backbone(path, num_classes=5).eval()
        assert head(x).shape == (2, 5)
        torch.testing.assert_close(head.forward_features(x), ref, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        export_backbone(obj, tmp_path / "gfm_backbone.pth")


def test_bf16_autocast_keeps_loss_parts_in_float32(teacher_file):
    obj = _objective(teacher_file)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(_batch())
    assert all(out[k].dtype == torch.float32 for k in ("loss", "mim", "distill", "cosine", "embed_std"))
    out["loss"].backward()
    assert obj.student.mask_token.grad is not None and torch.isfinite(obj.student.mask_token.grad).all()


def test_checkpoints_leave_the_frozen_teacher_out(teacher_file):
    obj = _objective(teacher_file)
    sd = obj.state_dict()
    assert sd and not any(k.startswith("teacher.") for k in sd)
    assert any(k.startswith("student.encoder.") for k in sd)
    fresh = _objective(teacher_file, seed=1)
    fresh.load_state_dict(sd, strict=True)  # the teacher comes from its own file, not the checkpoint
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in sd.items() if not k.startswith("projector.")}, strict=True)


def test_bf16_backends_keep_the_frozen_teacher_in_bf16_with_the_same_result(teacher_file):
    from gfm_core.training.backends import TorchBackend
    from gfm_core.training.optim import build_optimizer, param_groups

    ref, obj = _objective(teacher_file), _objective(teacher_file)
    fp32 = TorchBackend("cpu", "fp32")
    fp32.prepare(ref, build_optimizer(param_groups(ref, 0.05), lr=1e-3))
    assert {p.dtype for p in ref.parameters()} == {torch.float32}
    backend = TorchBackend("cpu", "bf16")
    backend.prepare(obj, build_optimizer(param_groups(obj, 0.05), lr=1e-3))
    assert obj.teacher.compute_dtype == torch.bfloat16
    assert obj.teacher.model.layers[2].blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert {p.dtype for p in obj.parameters() if p.requires_grad} == {torch.float32}  # trainable stay fp32
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(batch)
    out = backend.forward(batch)
    assert torch.equal(out["loss"], expected["loss"]) and torch.equal(out["distill"], expected["distill"])
    backend.backward(out["loss"])
    assert backend.step() > 0


def test_cuda_builds_use_fused_attention_cpu_builds_keep_timms():
    def fused(device):
        cfg = PretrainCfg(student=STUDENT, alpha=0.0, mask_patch_size=16, device=device)
        flags = {m.fused_attn for m in build_continual_pretrain(cfg).modules() if hasattr(m, "fused_attn")}
        assert len(flags) == 1
        return flags.pop()

    assert fused("cuda") is True  # building needs no GPU: the modules are only switched
    assert fused("cpu") is False
    assert fused("auto") is torch.cuda.is_available()
