"""Dense-head decoders (FPN, UPerNet) over tiny Swin and CNN backbones; the decoder option through fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers.rasters import make_geotiff

from gfm_core.config import BackboneSpec, FinetuneCfg, TaskCfg, load_params
from gfm_core.errors import ConfigError
from gfm_core.models.decoders import POOL_SCALES, FPNDecoder, UPerNetDecoder, build_decoder
from gfm_core.models.heads import build_task_model
from gfm_core.stages.finetune import finetune
from gfm_core.training.setup import schedule

SWIN = "swin_tiny_patch4_window7_224"
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)
# input size per backbone: the Swin's last level is 1x1 at 32 px, the CNN's 2x2 at 64 px (PPM on tiny maps)
SIZES = {"swin": 32, "resnet": 64}


def _backbone(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "swin":
        return timm.create_model(SWIN, pretrained=False, num_classes=0, img_size=SIZES["swin"], **TINY_SWIN)
    return timm.create_model("resnet10t", pretrained=False, num_classes=0)


@pytest.mark.parametrize("decoder", ["fpn", "upernet"])
@pytest.mark.parametrize("head", ["segmentation", "change"])
@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_dense_heads_shapes_and_gradients(backbone, head, decoder):
    size, k = SIZES[backbone], 4 if head == "segmentation" else 2
    model = build_task_model(head, _backbone(backbone), num_outputs=k, decoder_dim=8, decoder=decoder)
    expected = UPerNetDecoder if decoder == "upernet" else FPNDecoder
    assert type(model.head.decoder) is expected
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 2, 3, size, size) if head == "change" else (2, 3, size, size), generator=g)
    out = model(x)
    assert tuple(out.shape) == (2, k, size, size) and torch.isfinite(out).all()
    label = torch.randint(0, k, (2, size + 8, size + 8), generator=g)  # labels keep their native size
    assert tuple(model.head.predict(out, label).shape) == (2, size + 8, size + 8)
    losses = model.head.loss(out, label)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    stem = next(p for n, p in model.backbone.named_parameters() if p.dim() == 4)  # patch embed / stem conv
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def _levels(sizes=(32, 16, 8, 4), channels=(8, 12, 16, 24), b: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(channels, sizes, strict=True)]


def test_upernet_pyramid_pooling_gives_the_last_level_global_reach():
    """A change in one corner of the coarsest level reaches the opposite corner of the output only through
    the global (1x1) pool of the PPM; the FPN's 3x3 convs keep it local."""
    torch.manual_seed(0)
    feats = _levels()
    moved = [f.clone() for f in feats]
    moved[-1][:, :, 0, 0] += 5.0
    far = (slice(None), slice(None), -1, -1)
    for cls, reaches in ((UPerNetDecoder, True), (FPNDecoder, False)):
        dec = cls([8, 12, 16, 24], 8).eval()
        with torch.no_grad():
            a, b = dec(feats), dec(moved)
        assert a.shape == (2, 8, 32, 32)
        assert (not torch.equal(a[far], b[far])) == reaches, cls.__name__
        assert not torch.equal(a[:, :, 0, 0], b[:, :, 0, 0])  # the near corner changes in both
    dec = UPerNetDecoder([8, 12, 16, 24], 8)
    assert [m[0].output_size for m in dec.ppm.branches] == list(POOL_SCALES)
    assert len(dec.lateral) == len(dec.fpn) == 3  # the last level's lateral is the PPM


@pytest.mark.parametrize("last", [1, 2])
def test_upernet_on_tiny_maps_and_one_level(last):
    dec = UPerNetDecoder([8, 12], 6)
    out = dec(_levels(sizes=(2 * last, last), channels=(8, 12)))
    assert out.shape == (2, 6, 2 * last, 2 * last) and torch.isfinite(out).all()
    single = UPerNetDecoder([12], 6)
    assert single(_levels(sizes=(last,), channels=(12,)))[0].shape == (6, last, last)


def test_decoder_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown decoder 'unet'; valid: fpn, upernet"):
        build_decoder("unet", [8], 4)
    with pytest.raises(ConfigError, match="unknown decoder 'unet'"):
        build_task_model("classification", _backbone("swin"), num_outputs=3, decoder="unet")
    with pytest.raises(ConfigError, match=">= 2 samples per batch"):
        UPerNetDecoder([8, 12], 6).train()(_levels(channels=(8, 12), sizes=(4, 2), b=1))
    with pytest.raises(ValueError, match="decoder is an option of the segmentation and change heads"):
        TaskCfg(name="t", head="classification", layout="ucmerced", root=Path("x"), img_size=32, decoder="upernet")


def test_paper_preset_uses_upernet_and_40k_iterations(repo_root):
    paper = load_params(repo_root / "params.yaml", preset="").finetune
    assert (paper.decoder, paper.decoder_dim) == ("upernet", 512)
    seg = [t for t in paper.tasks if t.head == "segmentation"]
    assert [t.name for t in seg] == ["whu", "vaihingen"]
    for task, n_train in zip(seg, (4736, 344), strict=True):  # the paper's training set sizes
        assert task.max_steps == 40000
        for world in (1, 2):  # the step budget binds on any number of GPUs, not the epochs
            plan = schedule(paper, steps_per_epoch=n_train // paper.batch_size // world, epochs=task.epochs,
                            limit=task.max_steps, global_batch=paper.batch_size * world)
            assert (plan["total_steps"], plan["warmup_steps"]) == (40000, 8000)  # 20 of 100 epochs' share
    demo = load_params(repo_root / "params.yaml", preset="demo").finetune
    assert demo.decoder == "fpn"


def _seg_task(root: Path, n_train: int = 4) -> TaskCfg:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", 2)):
        for i in range(n):
            image = rng.uniform(0, 255, (3, 32, 32)).astype(np.float32)
            make_geotiff(root / split / "images" / f"t{i}.tif", data=image, crs=None)
            mask = (image[0] > 127).astype(np.uint8)[None]  # a class that the pixels show
            make_geotiff(root / split / "masks" / f"t{i}.tif", data=mask, crs=None)
    return TaskCfg(name="seg", head="segmentation", layout="folders", root=root, img_size=32, num_classes=2,
                   value_range=(0, 255))


def test_finetune_with_upernet_from_the_config_or_the_task(tmp_path):
    task = _seg_task(tmp_path / "data")
    spec = BackboneSpec(name="random", kind="random", arch=SWIN, timm_kwargs=dict(TINY_SWIN))
    base = dict(batch_size=2, eval_batch_size=2, epochs=100, max_steps=3, decoder_dim=8, drop_path_rate=0.0,
                device="cpu", precision="fp32", num_workers=0, log_every=1)
    runs = {}
    for name, cfg_decoder, task_decoder in (("cfg", "upernet", None), ("task", "fpn", "upernet"), ("fpn", "fpn", None)):
        cfg = FinetuneCfg(out_dir=tmp_path / name, decoder=cfg_decoder, **base)
        runs[name] = finetune(cfg, task.model_copy(update={"decoder": task_decoder}), spec, seed=0,
                              out_dir=tmp_path / name)
    res = runs["cfg"]
    assert res.steps == 3 and len(res.history) == 3
    assert all(np.isfinite(v) for v in res.metrics.values()) and "mIoU" in res.metrics
    losses = {name: [h["loss"] for h in r.history] for name, r in runs.items()}
    assert losses["cfg"] == losses["task"]  # the task's decoder overrides finetune.decoder
    assert losses["cfg"][0] != losses["fpn"][0]
    assert res.metrics == runs["task"].metrics
