"""The paper's fine-tuning recipe: layer-wise lr decay (GFM/SimMIM rule), Mixup/CutMix/label smoothing,
RandomResizedCrop and flips."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from helpers.rasters import make_geotiff
from timm.optim import param_groups_layer_decay

from gfm_core.config import BackboneSpec, FinetuneCfg, TaskCfg
from gfm_core.data.tasks.augment import SampleAugment
from gfm_core.data.tasks.dataset import TaskDataset
from gfm_core.errors import ConfigError
from gfm_core.models.heads import build_task_model
from gfm_core.objectives import Finetune
from gfm_core.objectives.mixing import BatchMix, batch_mix
from gfm_core.stages.finetune import finetune
from gfm_core.training.optim import layer_decay_fn, param_groups

TINY_SWIN: dict[str, Any] = dict(img_size=32, window_size=4, embed_dim=16, num_heads=(1, 1, 2, 2))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


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


# ------------------------------------------------------------------------------ Mixup, CutMix, smoothing


def _tiny_classifier(k: int) -> Finetune:
    torch.manual_seed(0)
    backbone = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                                 depths=(1, 1, 1, 1), **TINY_SWIN)
    return Finetune(build_task_model("classification", backbone, num_outputs=k))


def _record_loss_inputs(objective: Finetune) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What reaches the head's loss in each training step: (image, target)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    images: list[torch.Tensor] = []
    objective.model.register_forward_pre_hook(lambda _m, args: images.append(args[0].detach().clone()))
    loss = objective.model.head.loss

    def recording(out, target):
        seen.append((images[-1], target.detach().clone()))
        return loss(out, target)

    objective.model.head.loss = recording  # type: ignore[method-assign]
    return seen


def _constant_batch(b: int) -> dict[str, torch.Tensor]:
    """Image i is the constant i (3 x 32 x 32), label i: how much of sample j a mixed image holds is its mean."""
    return {"image": torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 32, 32).contiguous(),
            "label": torch.arange(b)}


def test_classification_training_sees_mixed_images_and_soft_targets():
    k, b, s = 8, 8, 0.1
    objective = _tiny_classifier(k)
    objective.mix = batch_mix(FinetuneCfg(mixup=0.8, cutmix=1.0, label_smoothing=s), "classification", k)
    seen = _record_loss_inputs(objective)
    np.random.seed(0)  # timm's Mixup draws from numpy
    batch = _constant_batch(b)
    untouched = batch["image"].clone()
    kinds = set()
    for _ in range(8):  # with this seed: 7 Mixup batches, 1 CutMix
        out = objective(batch)
        assert torch.isfinite(out["loss"]) and set(out) == {"loss", "acc"}
    assert torch.equal(batch["image"], untouched)  # the loader's batch is not mixed in place
    for image, target in seen:
        assert target.shape == (b, k) and target.dtype == torch.float32
        torch.testing.assert_close(target.sum(1), torch.ones(b))
        assert target.max() < 1 and target.min() >= s / k - 1e-6  # smoothed
        assert ((target > s / k + 1e-4).sum(1) == 2).all()  # every row mixes two classes: not one-hot
        for i in range(b):  # image and target mixed with the same weight: own share w, partner b-1-i
            w = float(target[i, i] - s / k) / (1 - s)
            assert image[i].mean().item() == pytest.approx(w * i + (1 - w) * (b - 1 - i), abs=1e-4)
            kinds.add("mixup" if image[i].unique().numel() == 1 else "cutmix")
    assert kinds == {"mixup", "cutmix"}  # both drawn (switch probability 0.5)


def test_label_smoothing_alone_and_all_off():
    k, b = 5, 4
    objective = _tiny_classifier(k)
    seen = _record_loss_inputs(objective)
    batch = {"image": torch.randn(b, 3, 32, 32), "label": torch.tensor([0, 3, 1, 4])}
    objective.mix = batch_mix(FinetuneCfg(label_smoothing=0.1), "classification", k)
    objective(batch)
    image, target = seen[-1]
    assert torch.equal(image, batch["image"])  # not mixed
    assert target.max().item() == pytest.approx(1 - 0.1 + 0.1 / k) and target.max() < 1
    assert torch.equal(target.argmax(1), batch["label"])
    # all three off (the pydantic defaults, the demo preset): no mixing object, the plain labels reach the loss
    objective.mix = batch_mix(FinetuneCfg(), "classification", k)
    assert objective.mix is None
    objective(batch)
    assert torch.equal(seen[-1][1], batch["label"]) and torch.equal(seen[-1][0], batch["image"])
    # eval mode never mixes
    objective.mix = batch_mix(FinetuneCfg(mixup=0.8, cutmix=1.0, label_smoothing=0.1), "classification", k)
    objective.eval()
    objective(batch)
    assert torch.equal(seen[-1][1], batch["label"])


def test_multilabel_targets_mixed_and_smoothed_as_gfms_mixup():
    k, b, s = 6, 4, 0.1
    mix = BatchMix("multilabel", k, mixup=0.8, label_smoothing=s)  # Mixup only: a blend, lam from the image
    y = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 1]]).float()
    np.random.seed(1)
    image, target = mix(_constant_batch(b)["image"], y)
    lam = (image[0].mean().item() - 3) / (0 - 3)  # image 0 = lam * 0 + (1 - lam) * 3
    assert 0 < lam < 1
    expected = (lam * y + (1 - lam) * y.flip(0)) * (1 - s) + s / k  # GFM data/mixup.py mixup_target
    torch.testing.assert_close(target, expected)
    assert target.shape == (b, k) and target.dtype == torch.float32


def test_odd_batch_leaves_the_last_sample_unmixed_and_dense_heads_are_not_mixed():
    k, b = 5, 5
    mix = BatchMix("classification", k, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    batch = _constant_batch(b)
    np.random.seed(0)
    image, target = mix(batch["image"], batch["label"] % k)
    assert image.shape == batch["image"].shape and target.shape == (b, k)
    assert torch.equal(image[-1], batch["image"][-1])
    assert target[-1].max().item() == pytest.approx(1 - 0.1 + 0.1 / k)
    assert not torch.equal(image[:-1], batch["image"][:-1])
    for head in ("segmentation", "change", "superres"):
        assert batch_mix(FinetuneCfg(mixup=0.8, cutmix=1.0, label_smoothing=0.1), head, 2) is None
    with pytest.raises(ConfigError, match="not 'segmentation'"):
        BatchMix("segmentation", 3, mixup=0.8)


def test_classification_loss_takes_soft_targets():
    head = _tiny_classifier(4).model.head
    logits = torch.randn(3, 4)
    ids = torch.tensor([2, 0, 3])
    hard = head.loss(logits, ids)
    soft = head.loss(logits, torch.nn.functional.one_hot(ids, 4).float())
    torch.testing.assert_close(soft["loss"], hard["loss"])
    assert soft["acc"] == hard["acc"]
    mixed = torch.tensor([[0.2, 0.0, 0.8, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    expected = -(mixed * logits.log_softmax(1)).sum(1).mean()  # soft-target cross-entropy
    torch.testing.assert_close(head.loss(logits, mixed)["loss"], expected)


# ------------------------------------------------------------------------------- crops and flips


def _ucmerced(root: Path, n: int = 1, img_size: int = 16) -> TaskCfg:
    """n images per class (2 classes) in the train list, the first of each in the test list."""
    images = root / "UCMerced_LandUse" / "Images"
    for c, cls in enumerate(("beach", "forest")):
        for i in range(n):
            make_geotiff(images / cls / f"{cls}{i:02d}.tif", bands=3, size=24, seed=10 * c + i)
    (root / "uc_merced-train.txt").write_text("".join(f"{c}{i:02d}.tif\n" for c in ("beach", "forest")
                                                      for i in range(n)))
    (root / "uc_merced-test.txt").write_text("beach00.tif\nforest00.tif\n")
    return TaskCfg(name="t", head="classification", layout="ucmerced", root=root, img_size=img_size)


def test_random_resized_crop_of_classification_samples(tmp_path):
    cfg = _ucmerced(tmp_path)
    plain = TaskDataset(cfg, "train", mean=MEAN, std=STD)
    cropped = TaskDataset(cfg, "train", mean=MEAN, std=STD, train=True, crop_scale=(0.3, 0.6))
    torch.manual_seed(0)
    ref, samples = plain[1]["image"], [cropped[1]["image"] for _ in range(4)]
    assert all(s.shape == ref.shape == (3, 16, 16) for s in samples)
    assert all(not torch.allclose(s, ref) for s in samples)
    assert not torch.allclose(samples[0], samples[1])  # a new crop per call
    # off outside training, without `augment`, and for dense heads (their labels would need the same crop)
    assert TaskDataset(cfg, "train", mean=MEAN, std=STD, crop_scale=(0.3, 0.6)).augment.crop_scale is None
    assert TaskDataset(cfg, "train", mean=MEAN, std=STD, train=True, augment=False,
                       crop_scale=(0.3, 0.6)).augment == SampleAugment()


def test_vertical_flips_keep_masks_aligned_with_images(tmp_path):
    rng = np.random.default_rng(0)
    band = np.where(rng.random((16, 16)) < 0.5, rng.uniform(0, 100, (16, 16)), rng.uniform(155, 255, (16, 16)))
    make_geotiff(tmp_path / "train/images/t0.tif", data=np.stack([band] * 3).astype(np.float32), crs=None)
    make_geotiff(tmp_path / "train/masks/t0.tif", data=(1 + (band > 127.5)).astype(np.uint8)[None], crs=None)
    cfg = TaskCfg(name="t", head="segmentation", layout="folders", root=tmp_path, img_size=16,
                  value_range=(0, 255), mask_values=(1, 2))
    ds = TaskDataset(cfg, "train", mean=MEAN, std=STD, train=True, vflip=True, crop_scale=(0.3, 0.6))
    assert ds.augment == SampleAugment(hflip=True, vflip=True)  # no crop for a dense head
    ref = TaskDataset(cfg, "train", mean=MEAN, std=STD)[0]
    assert torch.equal(ref["mask"], (ref["image"][0] > 0).long())  # the mask is the thresholded image
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        s = ds[0]
        assert torch.equal(s["mask"], (s["image"][0] > 0).long())
        seen |= {name for name, f in (("v", ref["image"].flip(-2)), ("hv", ref["image"].flip(-2).flip(-1)))
                 if torch.equal(s["image"], f)}
    assert seen == {"v", "hv"}


def test_recipe_config_and_presets(repo_root):
    from gfm_core.config import load_params

    paper = load_params(repo_root / "params.yaml", preset="").finetune
    assert (paper.mixup, paper.cutmix, paper.label_smoothing) == (0.8, 1.0, 0.1)
    assert paper.vflip and paper.crop_scale == (0.67, 1.0) and paper.augment
    demo = load_params(repo_root / "params.yaml", preset="demo").finetune
    assert (demo.mixup, demo.cutmix, demo.label_smoothing, demo.vflip, demo.crop_scale) == (0, 0, 0, False, None)
    assert demo.augment  # horizontal flips only, as before
    with pytest.raises(ValueError, match="crop_scale"):
        FinetuneCfg(crop_scale=(0.8, 0.5))


def test_the_stage_passes_the_recipe_to_the_training_batches(tmp_path):
    """Same seed, data and model: the recipe changes the first training loss (a plain run repeats it exactly)."""
    task = _ucmerced(tmp_path / "ucm", n=4, img_size=32)
    spec = BackboneSpec(name="r", kind="random", arch="swin_tiny_patch4_window7_224",
                        timm_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4))
    base = dict(batch_size=4, eval_batch_size=4, max_steps=1, drop_path_rate=0.0, device="cpu", num_workers=0,
                precision="fp32", log_every=1)
    recipe = dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1, crop_scale=(0.67, 1.0), vflip=True)

    def first_loss(name: str, **kw) -> float:
        cfg = FinetuneCfg(out_dir=tmp_path / "out", **base, **kw)
        return finetune(cfg, task, spec, seed=0, out_dir=tmp_path / name).history[0]["loss"]

    plain = first_loss("plain")
    assert first_loss("plain_again") == pytest.approx(plain, rel=1e-6)
    assert first_loss("paper", **recipe) != pytest.approx(plain, rel=1e-3)
