"""Training shards: pixels survive the round trip, ranks split the pile, rebuilds are lazy and atomic."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pytest
import rasterio
import torch
from helpers.rasters import make_geotiff, make_photo
from rasterio.errors import NotGeoreferencedWarning

from gfm_core.data.ingest.manifest import build_manifest
from gfm_core.data.ingest.shard_file import shard_geometry
from gfm_core.data.ingest.shards import INDEX_NAME, load_shard_index, write_shards
from gfm_core.data.ingest.sources import IngestSettings, folder_source
from gfm_core.data.pretrain.shard_dataset import ShardDataset, rank_partition
from gfm_core.data.raster.reader import read_image
from gfm_core.data.raster.stretch import Stretch
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


# ------------------------------------------------------------------------------------------ contrast stretch


def test_stretch_is_applied_before_quantisation_and_changes_the_generation(pile, tmp_path):
    plain = ShardDataset(pile["base"] / "shards")
    st = Stretch(lo=(0.2, 0.2, 0.2), hi=(0.6, 0.6, 0.6))
    out = tmp_path / "stretched"
    rep = write_shards(pile["report"].manifest_path, out, shard_size=SIZE, images_per_shard=3, workers=0,
                       progress=False, stretch={"pics": st})
    assert rep.rebuilt
    stretched = ShardDataset(out)
    i = [stretched.path(k) for k in range(len(stretched))].index("pics/a/same.png")
    ref = read_image(pile["root"] / "pics/a/same.png").array  # stored unresized: exact up to rounding
    want = np.clip((ref - 0.2) / 0.4, 0, 1) * 255
    got = stretched[i].numpy().astype(float)
    assert np.abs(got - want).max() <= 0.5 + 1e-4  # rounding to uint8 (float32 arithmetic)
    assert not torch.equal(stretched[i], plain[i])
    assert json.loads((out / INDEX_NAME).read_text())["settings"]["stretch"]["pics"]["lo"] == [0.2] * 3
    again = write_shards(pile["report"].manifest_path, out, shard_size=SIZE, images_per_shard=3, workers=0,
                         progress=False, stretch={"pics": Stretch(lo=(0.1,) * 3, hi=(0.6,) * 3)})
    assert again.rebuilt  # another stretch is another generation


def test_write_shards_refuses_bad_settings_and_empty_manifests(pile, tmp_path):
    with pytest.raises(ConfigError, match="max_aspect"):
        write_shards(pile["report"].manifest_path, tmp_path, max_aspect=0.5)
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"junk")
    with pytest.raises(DataValidationError, match=r"m\.parquet"):
        write_shards(bad, tmp_path / "s")
    assert not os.path.exists(tmp_path / "s")
