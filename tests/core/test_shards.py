"""Training shards: pixels survive the round trip, ranks split the pile, rebuilds are lazy and atomic."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pytest
import rasterio
import torch
from helpers.rasters import make_geotiff, make_photo
from rasterio.errors import NotGeoreferencedWarning
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from gfm_core.data.geopile import build_manifest
from gfm_core.data.masking import MaskGenerator
from gfm_core.data.pretrain_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormaliseToFloat,
    PretrainAugment,
    PretrainImages,
    list_pile,
    sample_seed,
)
from gfm_core.data.raster import read_image
from gfm_core.data.shards import (
    INDEX_NAME,
    ShardDataset,
    ShardPretrainImages,
    load_shard_index,
    rank_partition,
    shard_geometry,
    write_shards,
)
from gfm_core.data.sources import IngestSettings, folder_source
from gfm_core.errors import ConfigError, DataValidationError

SIZE = 32  # shard_size of these tests
SOURCES = [folder_source("pics", "pics")]
SETTINGS = IngestSettings(min_size=16, workers=0)
# (height, width) of each image: stored as-is, downscaled, capped to 2:1, small and elongated, georeferenced
SHAPES = {
    "a/same.png": (32, 32),
    "a/big.png": (48, 48),
    "a/wide.png": (40, 64),
    "b/tall.png": (96, 40),
    "b/small.png": (20, 24),
    "b/strip.png": (20, 70),
    "b/geo.tif": (36, 36),
}


def make_pile(root):
    for i, (rel, (h, w)) in enumerate(sorted(SHAPES.items())):
        if rel.endswith(".tif"):
            make_geotiff(root / "pics" / rel, size=(h, w), seed=i)
        else:
            make_photo(root / "pics" / rel, size=(h, w), seed=i)


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    base = tmp_path_factory.mktemp("spile")
    make_pile(base / "data")
    report = build_manifest(base / "data", SOURCES, base / "ingest", settings=SETTINGS, progress=False)
    assert report.accepted == len(SHAPES)
    shards = write_shards(
        report.manifest_path, base / "shards", shard_size=SIZE, images_per_shard=3, workers=0, progress=False
    )
    return dict(base=base, root=base / "data", report=report, shards=shards)


def reference(path, shard_size=SIZE, max_aspect=2.0):
    """The stored image recomputed independently: read_image, centre cap, torch antialiased resize, uint8."""
    img = read_image(path)
    rows, cols, out_h, out_w = shard_geometry(img.info.height, img.info.width, shard_size, max_aspect)
    x = torch.from_numpy(img.array[:, rows, cols].copy())
    if x.shape[1:] != (out_h, out_w):
        x = torch.nn.functional.interpolate(x[None], size=(out_h, out_w), mode="bilinear", antialias=True)[0]
    return x.mul(255).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip_pixels_match_resized_read_image(pile):
    ds = ShardDataset(pile["base"] / "shards")
    assert len(ds) == len(SHAPES)
    assert [ds.path(i) for i in range(len(ds))] == sorted(f"pics/{r}" for r in SHAPES)
    for i in range(len(ds)):
        x = ds[i]
        ref = reference(pile["root"] / ds.path(i))
        assert x.dtype == torch.uint8 and x.shape == ref.shape
        assert (x.int() - ref.int()).abs().max() <= 1, ds.path(i)
        assert torch.equal(ds.view(i), x)


def test_geometry_short_side_capped_aspect_kept(pile):
    ds = ShardDataset(pile["base"] / "shards")
    shapes = {ds.path(i).removeprefix("pics/"): tuple(ds[i].shape[1:]) for i in range(len(ds))}
    assert shapes == {
        "a/same.png": (32, 32),  # already at size
        "a/big.png": (32, 32),  # downscaled
        "a/wide.png": (32, 51),  # aspect 1.6 kept
        "b/tall.png": (64, 32),  # 96x40 capped to the centred 80x40 (2:1), then downscaled
        "b/small.png": (20, 24),  # smaller than shard_size: never upscaled
        "b/strip.png": (20, 40),  # 20x70 capped to 20x40
        "b/geo.tif": (32, 32),
    }


def test_unresized_8bit_images_are_stored_pixel_exact(pile):
    ds = ShardDataset(pile["base"] / "shards")
    for name in ("pics/a/same.png", "pics/b/small.png"):
        i = [ds.path(k) for k in range(len(ds))].index(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(pile["root"] / name) as src:
                raw = torch.from_numpy(src.read())
        assert torch.equal(ds[i], raw)


def test_shard_files_are_plain_arrow_with_the_index(pile):
    index = load_shard_index(pile["base"] / "shards")
    assert index["manifest_content_hash"] == pile["report"].content_hash
    assert [s["images"] for s in index["shards"]] == [3, 3, 1]
    assert index["images"] == len(SHAPES) == pile["shards"].images
    with pa.memory_map(str(pile["base"] / "shards" / index["shards"][0]["file"])) as mm:
        table = pa.ipc.open_file(mm).read_all()
    assert table.column_names == ["path", "source", "sha256", "channels", "height", "width", "pixels"]
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["pixels"]) == row["height"] * row["width"] * row["channels"]


def test_view_is_zero_copy_and_getitem_a_writable_copy(pile):
    ds = ShardDataset(pile["base"] / "shards")
    v1, v2 = ds.view(0), ds.view(0)
    assert v1.data_ptr() == v2.data_ptr()  # the same mapped bytes, no copy
    x = ds[0]
    assert x.data_ptr() != v1.data_ptr() and x.is_contiguous()
    x.zero_()  # a copy: safe to modify
    assert ds.view(0).any()


# --------------------------------------------------------------------------------------- rank partitions


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [None, 7])
def test_rank_partitions_are_disjoint_equal_and_cover(world, seed):
    n = 23
    for epoch in (0, 1):
        parts = [rank_partition(n, r, world, seed=seed, epoch=epoch) for r in range(world)]
        assert {len(p) for p in parts} == {n // world}
        flat = np.concatenate(parts)
        assert len(set(flat.tolist())) == len(flat) == n - n % world  # disjoint, remainder dropped
        assert flat.min() >= 0 and flat.max() < n
    if seed is not None and world > 1:
        assert not np.array_equal(
            rank_partition(n, 0, world, seed=seed), rank_partition(n, 0, world, seed=seed, epoch=1)
        )


def test_rank_partition_rejects_bad_ranks():
    with pytest.raises(ConfigError, match="rank 2 must lie in"):
        rank_partition(10, 2, 2)
    with pytest.raises(ConfigError, match="cannot be split over 4 ranks"):
        rank_partition(3, 0, 4)


def test_shard_datasets_per_rank_read_disjoint_images(pile):
    world = 3
    per_rank = [ShardDataset(pile["base"] / "shards", rank=r, world_size=world) for r in range(world)]
    paths = [[d.path(i) for i in range(len(d))] for d in per_rank]
    assert [len(p) for p in paths] == [len(SHAPES) // world] * world
    flat = [p for ps in paths for p in ps]
    assert len(set(flat)) == len(flat) == world * (len(SHAPES) // world)
    for d, ps in zip(per_rank, paths, strict=True):  # the rank's items are the global ones it names
        full = ShardDataset(pile["base"] / "shards")
        assert [full.path(d.global_index(i)) for i in range(len(d))] == ps


# ------------------------------------------------------------------------------------ lazy, atomic rebuilds


def test_rebuild_skipped_when_manifest_unchanged(pile, tmp_path):
    shutil.copytree(pile["base"] / "shards", tmp_path / "shards")
    index = tmp_path / "shards" / INDEX_NAME
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*")}
    again = write_shards(
        pile["report"].manifest_path, tmp_path / "shards", shard_size=SIZE, images_per_shard=3
    )
    assert again.rebuilt is False and again.content_hash == pile["report"].content_hash
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*")} == before
    changed = write_shards(
        pile["report"].manifest_path,
        tmp_path / "shards",
        shard_size=24,
        images_per_shard=3,
        workers=0,
        progress=False,
    )
    assert changed.rebuilt is True  # other settings: rebuilt, into a new generation
    gens = [p.name for p in (tmp_path / "shards").iterdir() if p.is_dir()]
    assert len(gens) == 1 and json.loads(index.read_text())["shards"][0]["file"].startswith(gens[0])


def test_rebuild_when_the_manifest_changes(pile, tmp_path):
    root = tmp_path / "data"
    make_pile(root)
    m1 = build_manifest(root, SOURCES, tmp_path / "ingest", settings=SETTINGS, progress=False)
    r1 = write_shards(m1.manifest_path, tmp_path / "shards", shard_size=SIZE, workers=0, progress=False)
    make_photo(root / "pics" / "c" / "new.png", size=40, seed=99)
    m2 = build_manifest(root, SOURCES, tmp_path / "ingest", settings=SETTINGS, progress=False)
    assert m2.content_hash != m1.content_hash
    r2 = write_shards(m2.manifest_path, tmp_path / "shards", shard_size=SIZE, workers=0, progress=False)
    assert r2.rebuilt and r2.images == r1.images + 1 and r2.content_hash == m2.content_hash
    ds = ShardDataset(tmp_path / "shards")
    assert ds.content_hash == m2.content_hash and "pics/c/new.png" in [ds.path(i) for i in range(len(ds))]
    assert len([p for p in (tmp_path / "shards").iterdir() if p.is_dir()]) == 1  # the old generation is gone


def test_failed_build_publishes_nothing_and_keeps_the_previous_shards(pile, tmp_path):
    """Both builds run in a process pool: the first must equal the in-process one, the second fails."""
    root = tmp_path / "data"
    make_pile(root)
    m = build_manifest(root, SOURCES, tmp_path / "ingest", settings=SETTINGS, progress=False)
    shard_dir = tmp_path / "shards"
    write_shards(m.manifest_path, shard_dir, shard_size=SIZE, images_per_shard=2, workers=2, progress=False)
    a, b = ShardDataset(pile["base"] / "shards"), ShardDataset(shard_dir)  # same pixels as workers=0
    assert len(a) == len(b) and all(torch.equal(a[i], b[i]) for i in range(len(a)))
    index_before = (shard_dir / INDEX_NAME).read_bytes()
    files_before = sorted(p.relative_to(shard_dir) for p in shard_dir.rglob("*"))
    make_photo(root / "pics" / "b" / "strip.png", size=(20, 70), seed=1234)  # changed after ingestion

    with pytest.raises(DataValidationError, match=r"strip\.png: the file changed since the manifest"):
        write_shards(
            m.manifest_path,
            shard_dir,
            shard_size=SIZE,
            images_per_shard=2,
            workers=2,
            force=True,
            progress=False,
        )

    assert (shard_dir / INDEX_NAME).read_bytes() == index_before
    assert sorted(p.relative_to(shard_dir) for p in shard_dir.rglob("*")) == files_before  # no temp leftovers
    assert len(ShardDataset(shard_dir)) == len(SHAPES)  # the previous generation still reads

    fresh = tmp_path / "fresh"
    with pytest.raises(DataValidationError):
        write_shards(m.manifest_path, fresh, shard_size=SIZE, images_per_shard=2, workers=0, progress=False)
    assert list(fresh.iterdir()) == []  # first build failed: no index, no shard visible
    with pytest.raises(DataValidationError, match="cannot read the shard index"):
        ShardDataset(fresh)


# ----------------------------------------------------------------------------------- pretraining samples


def make_dataset(pile, **kw):
    mask = MaskGenerator(16, mask_patch_size=4, model_patch_size=2, mask_ratio=0.6)
    return ShardPretrainImages(pile["base"] / "shards", 16, mask, seed=3, **kw)


def test_shard_pretrain_samples_shapes_and_normalisation(pile):
    ds = make_dataset(pile)
    assert len(ds) == len(SHAPES)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
        assert s["mask"].shape == (8, 8) and s["mask"].dtype == torch.bool
        assert int(s["mask"].sum()) == 10 * 2 * 2  # ceil(0.6 * 16) cells of 2x2 tokens
        mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
        pixels = s["image"] * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_shard_pretrain_samples_are_a_function_of_seed_epoch_index(pile):
    a, b = make_dataset(pile), make_dataset(pile)
    torch.manual_seed(123)  # the global RNG does not matter
    s1 = a[2]
    torch.manual_seed(456)
    assert torch.equal(s1["image"], b[2]["image"]) and torch.equal(s1["mask"], b[2]["mask"])
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], s1["image"])
    b.set_epoch(1)
    assert torch.equal(a[2]["image"], b[2]["image"])
    clone = pickle.loads(pickle.dumps(a))  # what DataLoader workers receive: no pixels, no mappings
    assert len(pickle.dumps(a)) < 20_000
    assert torch.equal(clone[2]["image"], a[2]["image"])
    batch = next(iter(DataLoader(a, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 8, 8)


def test_shard_samples_match_file_samples_from_the_same_augmentation(pile):
    """For an image stored unresized, the shard sample equals PretrainImages' (same crop, up to 1/255)."""
    mask = MaskGenerator(16, mask_patch_size=4, model_patch_size=2, mask_ratio=0.6)
    shards = ShardPretrainImages(pile["base"] / "shards", 16, mask, seed=5)
    files = PretrainImages(list_pile(pile["root"], SOURCES), 16, mask, seed=5)
    paths = [shards.data.path(i) for i in range(len(shards))]
    assert [str(it.path.relative_to(pile["root"])) for it in files.items] == paths
    i = paths.index("pics/a/same.png")
    for epoch in (0, 4):
        shards.set_epoch(epoch)
        files.set_epoch(epoch)
        s, f = shards[i], files[i]
        assert torch.equal(s["mask"], f["mask"])
        assert (s["image"] - f["image"]).abs().max() < 1.5 / 255 / 0.224  # uint8 vs float resize rounding
    aug = PretrainAugment(16, mask)
    direct = aug(shards.data.view(i), sample_seed(5, 4, i))
    assert torch.equal(direct["image"], shards[i]["image"])  # one augmentation implementation


def test_fused_normalisation_equals_todtype_then_normalize():
    ref = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    )
    fused = NormaliseToFloat(IMAGENET_MEAN, IMAGENET_STD)
    hwc = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).permute(2, 0, 1)  # channels-last, as shards
    flt = torch.rand(3, 20, 30)
    for x in (hwc, flt):
        before = x.clone()
        y = fused(x)
        assert y.dtype == torch.float32 and y.is_contiguous()
        assert torch.allclose(y, ref(x), atol=1e-5)
        assert torch.equal(x, before)  # the input is never modified
    with pytest.raises(TypeError, match="uint8 or float32"):
        fused(torch.zeros(3, 2, 2, dtype=torch.int16))


def test_shard_pretrain_ranks_and_epoch_resplit(pile):
    world = 2
    ranks = [make_dataset(pile, rank=r, world_size=world, shuffle_ranks=True) for r in range(world)]
    for epoch in (0, 1):
        for d in ranks:
            d.set_epoch(epoch)
        got = [d.data.global_index(i) for d in ranks for i in range(len(d))]
        assert len(got) == len(set(got)) == 2 * (len(SHAPES) // 2)
    full = make_dataset(pile)
    full.set_epoch(1)
    g = ranks[1].data.global_index(0)
    assert torch.equal(ranks[1][0]["image"], full[g]["image"])  # randomness follows the global index


def test_channel_mismatch_names_the_file(pile):
    mask = MaskGenerator(16, mask_patch_size=4, model_patch_size=2)
    ds = ShardPretrainImages(
        pile["base"] / "shards", 16, mask, mean=(0.5, 0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2, 0.2)
    )
    with pytest.raises(ConfigError, match=r"pics/a/big\.png: 3 band\(s\) read but the model takes 4"):
        ds[0]


def test_write_shards_refuses_bad_settings_and_empty_manifests(pile, tmp_path):
    with pytest.raises(ConfigError, match="max_aspect"):
        write_shards(pile["report"].manifest_path, tmp_path, max_aspect=0.5)
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"junk")
    with pytest.raises(DataValidationError, match=r"m\.parquet"):
        write_shards(bad, tmp_path / "s")
    assert not os.path.exists(tmp_path / "s")
