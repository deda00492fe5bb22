"""Pretraining samples: crops on the fly from shards, weighted sources, held-out images, the teacher pool."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from helpers.rasters import make_geotiff
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from gfm_core.data.ingest.manifest import build_manifest
from gfm_core.data.ingest.shards import write_shards
from gfm_core.data.ingest.sources import IngestSettings, folder_source
from gfm_core.data.pretrain.masking import MaskGenerator
from gfm_core.data.pretrain.shard_dataset import ShardDataset
from gfm_core.data.pretrain.stream import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormaliseToFloat,
    PretrainStream,
    holdout_images,
    random_resized_crop,
    sample_seed,
)
from gfm_core.data.pretrain.teacher_pool import load_or_build_pool
from gfm_core.errors import ConfigError

SOURCES = [folder_source("big", "big"), folder_source("small", "small")]
SIZES = {"big": [(64, 96)] * 6, "small": [(32, 32)] * 12}  # "big" holds 3x the pixels of "small"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    k = 0
    for src, shapes in SIZES.items():
        for i, hw in enumerate(shapes):
            make_geotiff(base / "data" / src / "c" / f"{i:02d}.tif", size=hw, seed=k)
            k += 1
    rep = build_manifest(base / "data", SOURCES, base / "ingest", settings=IngestSettings(min_size=16, workers=0),
                         progress=False)
    write_shards(rep.manifest_path, base / "shards", shard_size=128, workers=0, progress=False)
    return base / "shards"


def stream(shards, **kw):
    mask = MaskGenerator(16, mask_patch_size=4, model_patch_size=2, mask_ratio=0.6)
    return PretrainStream(shards, 16, mask, seed=kw.pop("seed", 3), **kw)


def test_samples_shapes_normalisation_and_determinism(shards):
    a, b = stream(shards), stream(shards)
    assert len(a) == 18  # each image once per epoch (the paper's epoch)
    s = a[2]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (8, 8) and int(s["mask"].sum()) == 10 * 4
    pixels = s["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    torch.manual_seed(1)  # the global RNG does not matter
    assert torch.equal(b[2]["image"], s["image"]) and torch.equal(b[2]["mask"], s["mask"])
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], s["image"])  # a new crop every epoch
    clone = pickle.loads(pickle.dumps(a))  # what DataLoader workers receive: no pixels, no mappings
    assert len(pickle.dumps(a)) < 20_000 and torch.equal(clone[2]["image"], a[2]["image"])
    batch = next(iter(DataLoader(a, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 8, 8)


def test_render_is_torchvision_resized_crop_flip_and_normalise(shards):
    st = stream(shards, samples_per_epoch=50)
    crop = st.sampler.draw(np.random.default_rng(0))
    x = ShardDataset(shards).view(crop.image)
    ref = TF.resized_crop(x, crop.top, crop.left, crop.height, crop.width, [16, 16], antialias=True)
    ref = TF.horizontal_flip(ref) if crop.flip else ref
    ref = v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))(ref.float() / 255)
    assert torch.allclose(st.render(crop), ref, atol=1e-5)


@pytest.mark.parametrize("hw", [(64, 96), (20, 200), (32, 32)])
def test_random_resized_crop_boxes_follow_the_ranges(hw):
    rng = np.random.default_rng(0)
    h, w = hw
    for _ in range(300):
        top, left, ch, cw = random_resized_crop(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        if (h, w) != (20, 200):  # the elongated image falls back to the centre crop at times
            assert 0.07 <= ch * cw / (h * w) <= 1.0 + 1e-9
            assert 3 / 4 * 0.85 <= cw / ch <= 4 / 3 / 0.85  # rounding to whole pixels


def test_weighted_draws_follow_source_weights_and_pixel_areas(shards):
    st = stream(shards, samples_per_epoch=4000, source_weights={"big": 0.25, "small": 0.75})
    rng = np.random.default_rng(1)
    drawn = [st.sampler.image(rng) for _ in range(4000)]
    share_small = np.mean([st.sources[i] == "small" for i in drawn])
    assert abs(share_small - 0.75) < 0.03  # 4000 draws: sd 0.007
    by_pixels = stream(shards, samples_per_epoch=4000)  # default: share of the pile's pixels
    big = np.mean([by_pixels.sources[by_pixels.sampler.image(rng)] == "big" for _ in range(4000)])
    assert abs(big - 6 * 64 * 96 / (6 * 64 * 96 + 12 * 32 * 32)) < 0.03
    only_big = stream(shards, samples_per_epoch=100, source_weights={"big": 1.0})
    assert {only_big.sources[only_big.sampler.image(rng)] for _ in range(200)} == {"big"}


def test_bad_weights_are_config_errors(shards):
    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['nope'\]"):
        stream(shards, samples_per_epoch=10, source_weights={"nope": 1.0})
    stream(shards, samples_per_epoch=10, source_weights={"nope": 0.0, "big": 1.0})  # 0: a source left out
    with pytest.raises(ConfigError, match=r"needs pretrain\.samples_per_epoch"):
        stream(shards, source_weights={"big": 1.0})
    with pytest.raises(ConfigError, match="all weights are 0"):
        stream(shards, samples_per_epoch=10, source_weights={"big": 0.0})


def test_holdout_rule_per_source_and_never_all():
    sources = ["a"] * 10 + ["b"] * 3 + ["c"]
    shas = [f"{i:064x}" for i in range(len(sources))]
    held = holdout_images(sources, shas, 0.1)
    counts = {s: sum(sources[i] == s for i in held) for s in "abc"}
    assert counts == {"a": 1, "b": 1, "c": 0}  # ceil(0.1 n), at most n - 1
    shuffled = list(reversed(shas))  # the choice follows content, not position
    moved = holdout_images(list(reversed(sources)), shuffled, 0.1)
    assert sorted(shuffled[i] for i in moved) == sorted(shas[i] for i in held)
    assert len(holdout_images(sources, shas, 0.0)) == 0


def test_training_never_draws_held_out_images_and_holdout_views_are_fixed(shards):
    st = stream(shards, samples_per_epoch=500, holdout_fraction=0.2)
    held = set(st.held_out.tolist())
    assert len(held) == math.ceil(0.2 * 6) + math.ceil(0.2 * 12)
    rng = np.random.default_rng(5)
    assert not held & {st.sampler.image(rng) for _ in range(2000)}
    a = st.holdout_samples(8)
    b = stream(shards, samples_per_epoch=500, holdout_fraction=0.2, seed=99).holdout_samples(8)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])  # the same for every seed
    with pytest.raises(ConfigError, match="no held-out images"):
        stream(shards).holdout_samples(4)


def test_normalise_to_float_equals_todtype_then_normalize():
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    fused = NormaliseToFloat(IMAGENET_MEAN, IMAGENET_STD)
    hwc = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).permute(2, 0, 1)  # channels-last, as shards
    for x in (hwc, torch.rand(3, 20, 30)):
        before = x.clone()
        y = fused(x)
        assert y.dtype == torch.float32 and y.is_contiguous() and torch.allclose(y, ref(x), atol=1e-5)
        assert torch.equal(x, before)
    with pytest.raises(TypeError, match="uint8 or float32"):
        fused(torch.zeros(3, 2, 2, dtype=torch.int16))


def test_channel_mismatch_names_the_file(shards):
    mask = MaskGenerator(16, mask_patch_size=4, model_patch_size=2)
    st = PretrainStream(shards, 16, mask, mean=(0.5,) * 4, std=(0.2,) * 4)
    with pytest.raises(ConfigError, match=r"big/c/00\.tif: 3 band\(s\) read but the model takes 4"):
        st[0]


def test_teacher_pool_targets_are_the_teachers_and_are_keyed_by_teacher(shards, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    calls = []

    def teacher(x):
        calls.append(len(x))
        return net(x)

    st = stream(shards, samples_per_epoch=64, holdout_fraction=0.2)
    path = tmp_path / "pool.safetensors"
    pool = load_or_build_pool(st, teacher, path, size=40, seed=0, teacher_id={"sha256": "a"}, batch_size=16)
    assert sum(calls) == 40 and len(pool) == 40 and pool.targets.shape == (40, 5)
    assert not set(pool.crops[:, 0].tolist()) & set(st.held_out.tolist())  # views of training images only
    with torch.no_grad():
        assert torch.allclose(pool.targets[7], net(st.render(pool.crop(7))[None])[0], atol=1e-6)
    again = load_or_build_pool(st, teacher, path, size=40, seed=0, teacher_id={"sha256": "a"})
    assert sum(calls) == 40 and torch.equal(again.targets, pool.targets)  # read back, not recomputed
    # the one-off cost the ledger reports: 40 views x a 3x3 conv 3 -> 5 over 14 x 14 outputs (2 FLOPs per MAC)
    assert pool.cost["flops"] == 40 * 2 * (14 * 14 * 5) * (3 * 3 * 3) and pool.cost["seconds"] > 0
    assert not pool.cost["cached"] and again.cost == {**pool.cost, "cached": True}  # the file keeps its cost
    other = load_or_build_pool(st, teacher, path, size=40, seed=0, teacher_id={"sha256": "b"})
    assert sum(calls) == 80 and other.key != pool.key  # a new teacher invalidates the stored targets
    st.pool = other
    s = st[3]
    j = int(np.random.default_rng(sample_seed(3, 0, 3)).integers(40))
    assert torch.equal(s["teacher_target"], other.targets[j])
    assert torch.equal(s["image"], st.render(other.crop(j)))  # the stored view is the rendered crop
    assert torch.equal(other.views[j], st.view(other.crop(j)))
