"""The paper's fine-tuning recipe: layer-wise lr decay (GFM/SimMIM rule)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import timm
from timm.optim import param_groups_layer_decay

from gfm_core.models.heads import build_task_model
from gfm_core.objectives import Finetune
from gfm_core.training.optim import layer_decay_fn, param_groups

TINY_SWIN: dict[str, Any] = dict(img_size=32, window_size=4, embed_dim=16, num_heads=(1, 1, 2, 2))


# ------------------------------------------------------------------------------------- layer-wise lr decay


def _paper_layer_id(simmim_name: str, depths: list[int]) -> int:
    """GFM/SimMIM ``optimizer.get_swin_layer`` on a SimMIM Swin parameter name, written out from the paper's code."""
    num_layers = sum(depths) + 2
    if simmim_name == "mask_token" or simmim_name.startswith("patch_embed"):
        return 0
    if simmim_name.startswith("layers"):
        parts = simmim_name.split(".")
        stage, block = int(parts[1]), parts[3]
        if block in ("reduction", "norm"):  # layers.<stage>.downsample.{reduction,norm}
            return sum(depths[: stage + 1])
        return sum(depths[:stage]) + int(block) + 1
    return num_layers - 1


def _simmim_name(timm_name: str) -> str:
    """timm starts stage i+1 with the patch merging that SimMIM ends stage i with."""
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", timm_name)
    return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else timm_name


def _paper_scale(timm_name: str, depths: list[int], decay: float) -> float:
    num_layers = sum(depths) + 2
    return decay ** (num_layers - 1 - _paper_layer_id(_simmim_name(timm_name), depths))


@pytest.fixture(scope="module")
def swin_b() -> Finetune:
    backbone = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
    return Finetune(build_task_model("classification", backbone, num_outputs=19))


@pytest.fixture(scope="module")
def tiny_swin() -> Finetune:
    backbone = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                                 depths=(1, 2, 3, 2), **TINY_SWIN)
    return Finetune(build_task_model("classification", backbone, num_outputs=5))


@pytest.mark.parametrize(("fixture", "depths"), [("swin_b", [2, 2, 18, 2]), ("tiny_swin", [1, 2, 3, 2])])
def test_layer_decay_equals_the_papers_formula_for_every_swin_parameter(fixture, depths, request):
    objective: Finetune = request.getfixturevalue(fixture)
    groups = param_groups(objective, 0.05, lr_scale_fn=layer_decay_fn(objective.model, 0.9))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    prefix = "model.backbone.model."
    checked = 0
    for name, p in objective.named_parameters():
        expected = _paper_scale(name[len(prefix):], depths, 0.9) if name.startswith(prefix) else 1.0  # head: 1
        assert scale_of[id(p)] == pytest.approx(expected, rel=1e-12), name
        checked += 1
    assert checked == len(list(objective.parameters()))


def test_layer_decay_landmarks_on_swin_b(swin_b):
    fn = layer_decay_fn(swin_b.model, 0.9)
    bb = "model.backbone.model."
    assert fn(bb + "norm.weight") == 1.0 and fn("model.head.fc.weight") == 1.0
    assert fn(bb + "layers.3.blocks.1.mlp.fc1.weight") == pytest.approx(0.9)
    assert fn(bb + "patch_embed.proj.weight") == pytest.approx(0.9**25)
    # the patch merging in front of stage 1 shares the lr of stage 0's last block (SimMIM ends stage 0 with it)
    assert fn(bb + "layers.1.downsample.reduction.weight") == fn(bb + "layers.0.blocks.1.attn.qkv.weight")
    assert fn(bb + "layers.1.downsample.reduction.weight") == pytest.approx(0.9**23)
    assert layer_decay_fn(swin_b.model, 1.0)(bb + "patch_embed.proj.weight") == 1.0


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet10t"])
def test_layer_decay_on_cnns_is_timms_param_groups_layer_decay(arch):
    """Non-Swin backbones: the scales timm's ``param_groups_layer_decay`` gives the same model with its classifier
    (which our head replaces: last id, scale 1; the last backbone group gets 0.9)."""
    full = timm.create_model(arch, pretrained=False, num_classes=7)
    names = {id(p): n for n, p in full.named_parameters()}
    reference = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(full, layer_decay=0.9)
                 for p in g["params"]}
    model = build_task_model("classification", timm.create_model(arch, pretrained=False, num_classes=0),
                             num_outputs=7)
    fn = layer_decay_fn(model, 0.9, prefix="")
    scales = {n[len("backbone.model."):]: fn(n) for n, _ in model.named_parameters() if n.startswith("backbone.")}
    assert scales and all(scales[n] == pytest.approx(reference[n], rel=1e-12) for n in scales)
    assert max(scales.values()) == pytest.approx(0.9) and fn("head.fc.weight") == 1.0
