"""Task readers on tiny folders in each layout (built here); clear errors for missing or bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.rasters import make_geotiff, make_photo

from gfm_core.config import TaskCfg
from gfm_core.data.tasks.bigearthnet import BEN19
from gfm_core.data.tasks.dataset import TaskDataset, label_subset
from gfm_core.data.tasks.index import DatasetNotFoundError
from gfm_core.data.tasks.layouts import OSCD_IMAGES, OSCD_LABELS, list_task
from gfm_core.errors import ConfigError, DataValidationError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 16


def _task(root: Path, head: str, layout: str, **kw) -> TaskCfg:
    return TaskCfg(name="t", head=head, layout=layout, root=root, img_size=SIZE, **kw)


def _mask(path: Path, values: np.ndarray) -> Path:
    return make_geotiff(path, data=values.astype(np.uint8)[None], crs=None)


def _ds(cfg: TaskCfg, split: str = "train", **kw) -> TaskDataset:
    return TaskDataset(cfg, split, mean=MEAN, std=STD, **kw)


# ------------------------------------------------------------------------------------------------ scene


def _ucmerced(root: Path) -> Path:
    images = root / "UCMerced_LandUse" / "Images"
    for c, cls in enumerate(("beach", "forest")):
        for i in range(3):
            make_geotiff(images / cls / f"{cls}{i:02d}.tif", bands=3, size=20, seed=10 * c + i)
    (root / "uc_merced-train.txt").write_text("beach00.tif\nforest01.tif\nbeach02.tif\n")
    (root / "uc_merced-test.txt").write_text("forest00.tif\n")
    return root


def test_ucmerced_layout(tmp_path):
    ds = _ds(_task(_ucmerced(tmp_path), "classification", "ucmerced"))
    assert len(ds) == 3 and ds.classes == ("beach", "forest") and ds.num_outputs == 2
    s = ds[1]
    assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
    assert int(s["label"]) == 1 and s["id"] == "forest01"
    # scaled to [0, 1] (uint8 / 255), then normalised with the backbone's mean/std
    raw = ds._raw(1)["image"]
    assert 0 <= raw.min() and raw.max() <= 1
    assert s["image"].min() >= (0 - 0.5) / 0.25 - 1e-5


def test_resisc45_layout(tmp_path):
    for cls in ("airplane", "beach"):
        for i in (1, 2):
            make_photo(tmp_path / "NWPU-RESISC45" / cls / f"{cls}_{i:03d}.jpg", size=24, seed=i)
    (tmp_path / "resisc45-val.txt").write_text("beach_002.jpg\nairplane_001.jpg\n")
    ds = _ds(_task(tmp_path, "classification", "resisc45"), "val")
    assert [int(ds[i]["label"]) for i in range(2)] == [1, 0]
    assert ds[0]["image"].shape == (3, SIZE, SIZE)


def test_eurosat_layout_reads_tif_for_jpg_names_and_selects_bands(tmp_path):
    base = tmp_path / "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
    for cls in ("AnnualCrop", "Forest"):
        make_geotiff(base / cls / f"{cls}_1.tif", bands=13, size=16, dtype="uint16", seed=3)
    (tmp_path / "eurosat-test.txt").write_text("Forest_1.jpg\nAnnualCrop_1.jpg\n")
    ds = _ds(_task(tmp_path, "classification", "eurosat", bands=(4, 3, 2)), "test")
    assert ds.channels == 3 and ds.classes == ("AnnualCrop", "Forest")
    assert int(ds[0]["label"]) == 1


# ------------------------------------------------------------------------------------------------ multilabel


def _bigearthnet(root: Path, labels: dict[str, list[str]], info: dict | None = None) -> Path:
    for i, (patch, names) in enumerate(labels.items()):
        folder = root / "BigEarthNet-v1.0" / patch
        for j, band in enumerate(("B02", "B03", "B04")):
            make_geotiff(folder / f"{patch}_{band}.tif", bands=1, size=12, dtype="uint16", seed=i * 3 + j)
        make_geotiff(folder / f"{patch}_B11.tif", bands=1, size=6, dtype="uint16", seed=i)  # a 20 m band
        (folder / f"{patch}_labels_metadata.json").write_text(json.dumps({"labels": names}))
    rows = "".join(f"{p},S1_{p}\n" for p in labels)
    for split in ("train", "val", "test"):
        (root / f"bigearthnet-{split}.csv").write_text(rows)
    if info is not None:
        (root / "info.json").write_text(json.dumps(info))
    return root


def test_bigearthnet_layout_maps_43_to_19_labels(tmp_path):
    root = _bigearthnet(
        tmp_path,
        {
            "S2A_p1": ["Continuous urban fabric", "Discontinuous urban fabric", "Sea and ocean"],
            "S2A_p2": ["Bare rock", "Mixed forest"],  # bare rock has no 19-class label
        },
    )
    ds = _ds(_task(root, "multilabel", "bigearthnet"))
    assert ds.classes == BEN19 and ds.num_outputs == 19
    s0, s1 = ds[0], ds[1]
    assert s0["image"].shape == (3, SIZE, SIZE) and s0["label"].dtype == torch.float32
    assert torch.nonzero(s0["label"]).flatten().tolist() == [0, 18]  # urban fabric, marine waters
    assert torch.nonzero(s1["label"]).flatten().tolist() == [10]  # mixed forest
    # 20 m bands are resampled to the 10 m grid of the first band
    mixed = _ds(_task(root, "multilabel", "bigearthnet", band_files=("B04", "B11")))
    assert mixed._raw(0)["image"].shape == (2, 12, 12)


def test_bigearthnet_classes_from_info_and_unknown_label(tmp_path):
    root = _bigearthnet(
        tmp_path,
        {"p1": ["forest"], "p2": ["water", "forest"]},
        info={"classes": {"1": "developed", "5": "forest", "6": "water"}},
    )
    ds = _ds(_task(root, "multilabel", "bigearthnet"))
    assert ds.classes == ("developed", "forest", "water")
    assert ds[1]["label"].tolist() == [0, 1, 1]
    bad = _ds(_task(root, "multilabel", "bigearthnet", classes=("developed", "forest")))
    with pytest.raises(DataValidationError, match=r"p2_labels_metadata\.json: label 'water' is not in"):
        bad[1]


# -------------------------------------------------------------------------------------------- segmentation


def _seg_folders(root: Path, n: int = 2, img_size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            make_geotiff(
                root / split / "images" / f"t{i}.tif",
                bands=6,
                size=img_size,
                dtype="float32",
                seed=i,
                data=rng.uniform(0, 255, (6, img_size, img_size)).astype(np.float32),
            )
            _mask(root / split / "masks" / f"t{i}.tif", rng.integers(0, 4, (img_size, img_size)))
    return root


def test_folders_segmentation_with_mask_values_and_native_size_masks(tmp_path):
    cfg = _task(
        _seg_folders(tmp_path),
        "segmentation",
        "folders",
        bands=(3, 2, 1),
        value_range=(0, 255),
        mask_values=(1, 2, 3),
    )
    ds = _ds(cfg, "test")
    s = ds[0]
    assert (
        s["image"].shape == (3, SIZE, SIZE) and s["mask"].shape == (20, 20) and s["mask"].dtype == torch.long
    )
    raw = ds._raw(0)["mask"]
    assert set(np.unique(raw)) <= {0, 1, 2, 255}  # codes 1..3 -> 0..2, code 0 -> ignore
    assert ds.num_outputs == 3


def test_segmentation_mask_out_of_range_is_an_error_naming_the_file(tmp_path):
    root = _seg_folders(tmp_path)
    ds = _ds(_task(root, "segmentation", "folders", bands=(3, 2, 1), num_classes=2))
    with pytest.raises(DataValidationError, match=r"masks/t0\.tif: mask values \[2, 3\] are outside 0\.\.1"):
        ds[0]


def test_folders_split_placeholder_and_tiling(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        make_photo(tmp_path / "img_dir" / "train" / f"a{i}.png", size=(40, 50), seed=i)
        _mask(tmp_path / "ann_dir" / "train" / f"a{i}.png", rng.integers(0, 3, (40, 50)))
    cfg = _task(
        tmp_path,
        "segmentation",
        "folders",
        dirs=("img_dir/{split}", "ann_dir/{split}"),
        num_classes=3,
        tile_size=32,
    )
    index = list_task(cfg, "train")
    # 40 x 50 px -> rows at 0, 8 and columns at 0, 18 (the last tile overlaps to cover the edge)
    assert [r.id for r in index.refs[:4]] == ["a0@0_0", "a0@0_18", "a0@8_0", "a0@8_18"]
    s = _ds(cfg)[3]
    assert s["mask"].shape == (32, 32) and s["image"].shape == (3, SIZE, SIZE)
    raw = _ds(cfg)._raw(3)
    full = _ds(
        _task(tmp_path, "segmentation", "folders", dirs=("img_dir/{split}", "ann_dir/{split}"), num_classes=3)
    )._raw(0)
    np.testing.assert_array_equal(raw["mask"], full["mask"][8:40, 18:50])


# ------------------------------------------------------------------------------------------------ change


def _levir(root: Path, n: int = 2, size: int = 20) -> Path:
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for i in range(1, n + 1):
            make_photo(root / "A" / f"{split}_{i}.png", size=size, seed=i)
            make_photo(root / "B" / f"{split}_{i}.png", size=size, seed=i + 10)
            _mask(root / "label" / f"{split}_{i}.png", (rng.random((size, size)) < 0.2) * 255)
    return root


def test_levircd_layout_stacks_the_pair(tmp_path):
    ds = _ds(_task(_levir(tmp_path), "change", "levircd"))
    s = ds[0]
    assert s["image"].shape == (2, 3, SIZE, SIZE) and s["mask"].shape == (20, 20)
    assert set(s["mask"].unique().tolist()) <= {0, 1} and s["id"] == "train_1"
    assert ds.num_outputs == 2


def test_change_pairs_of_different_size_or_bands_are_rejected(tmp_path):
    root = _levir(tmp_path)
    make_photo(root / "B" / "train_1.png", size=24, seed=3)  # other size
    make_photo(root / "B" / "train_2.png", size=20, seed=3, bands=1)  # other band count
    ds = _ds(_task(root, "change", "levircd"))
    with pytest.raises(
        DataValidationError,
        match=r"change pair 'train_1' does not match: .*A/train_1\.png is 3 bands "
        r"x 20x20 px but .*B/train_1\.png is 3 bands x 24x24 px",
    ):
        ds[0]
    with pytest.raises(DataValidationError, match=r"B/train_2\.png is 1 bands x 20x20 px"):
        ds[1]
    _mask(root / "label" / "test_1.png", np.zeros((8, 8)))
    with pytest.raises(
        DataValidationError, match=r"label .*test_1\.png is 8x8 px but the images are 20x20 px"
    ):
        _ds(_task(root, "change", "levircd"), "test")[0]


def test_oscd_layout_per_band_files(tmp_path):
    images, labels = tmp_path / OSCD_IMAGES, tmp_path / OSCD_LABELS.format("Train")
    for r, region in enumerate(("abudhabi", "beirut")):
        for t in (1, 2):
            for b in ("B02", "B03", "B04", "B08"):
                make_geotiff(
                    images / region / f"imgs_{t}_rect" / f"{b}.tif",
                    bands=1,
                    size=(24, 30),
                    dtype="uint16",
                    seed=r + t,
                )
        (images / region / "dates.txt").write_text("date_1: 20151126\ndate_2: 20170328\n")
        _mask(labels / region / "cm" / "cm.png", np.eye(24, 30) * 255)
    cfg = _task(tmp_path, "change", "oscd")
    ds = _ds(cfg)
    assert [r.id for r in ds.refs] == ["abudhabi", "beirut"]
    s = ds[1]
    assert (
        s["image"].shape == (2, 3, SIZE, SIZE) and s["mask"].shape == (24, 30) and int(s["mask"].sum()) == 24
    )
    with pytest.raises(ConfigError, match="unknown split 'val'; valid: train, test"):
        list_task(cfg, "val")
    with pytest.raises(DatasetNotFoundError, match=r"Test Labels.*OSCD test label folder not found"):
        list_task(cfg, "test")
    tiled = _ds(_task(tmp_path, "change", "oscd", tile_size=16))
    assert len(tiled) == 2 * 2 * 2 and tiled[0]["mask"].shape == (16, 16)


# ------------------------------------------------------------------------------------------------ superres


def _superres(root: Path, scale: int = 4, hr: int = 16) -> Path:
    for split in ("train", "test"):
        for i in range(2):
            make_geotiff(root / split / "hr" / f"x{i}.tif", bands=3, size=hr, dtype="float32", seed=i)
            make_geotiff(
                root / split / "lr" / f"x{i}.tif", bands=3, size=hr // scale, dtype="float32", seed=i
            )
    return root


def test_superres_folders(tmp_path):
    ds = _ds(_task(_superres(tmp_path), "superres", "folders"))
    s = ds[0]
    assert s["image"].shape == (3, SIZE, SIZE) and s["target"].shape == (3, 16, 16)
    assert 0 <= float(s["target"].min()) and float(s["target"].max()) <= 1
    assert ds.num_outputs == 3
    wrong = _ds(_task(tmp_path, "superres", "folders", scale=2))
    with pytest.raises(
        DataValidationError, match=r"HR .*hr/x0\.tif is 3 bands x 16x16 px but LR .* expected .* HR = 2 x LR"
    ):
        wrong[0]


# ------------------------------------------------------------------------------------------- missing paths


@pytest.mark.parametrize(
    ("layout", "head", "build", "missing"),
    [
        ("ucmerced", "classification", lambda r: None, "{root}"),
        (
            "ucmerced",
            "classification",
            lambda r: (r / "UCMerced_LandUse/Images/beach").mkdir(parents=True),
            "{root}/uc_merced-train.txt",
        ),
        ("resisc45", "classification", lambda r: r.mkdir(), "{root}/NWPU-RESISC45"),
        ("eurosat", "classification", lambda r: r.mkdir(), "{root}/ds/images/remote_sensing"),
        ("bigearthnet", "multilabel", lambda r: r.mkdir(), "{root}/BigEarthNet-v1.0"),
        ("geobench", "multilabel", lambda r: r.mkdir(), "{root}/classes.json"),
        ("oscd", "change", lambda r: r.mkdir(), f"{{root}}/{OSCD_IMAGES}"),
        ("levircd", "change", lambda r: r.mkdir(), "{root}/A"),
        (
            "folders",
            "segmentation",
            lambda r: (r / "train" / "images").mkdir(parents=True),
            "{root}/train/masks",
        ),
    ],
)
def test_missing_paths_are_named(tmp_path, layout, head, build, missing):
    root = tmp_path / "data"
    build(root)
    extra = {"num_classes": 2} if head == "segmentation" else {}
    with pytest.raises(DatasetNotFoundError) as err:
        _ds(_task(root, head, layout, **extra))
    assert missing.format(root=root) in str(err.value)
    assert "not found" in str(err.value) and f"layout '{layout}'" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_listed_but_missing_files_are_named(tmp_path):
    root = _ucmerced(tmp_path)
    (root / "uc_merced-train.txt").write_text("beach00.tif\nnope07.tif\n")
    with pytest.raises(
        DatasetNotFoundError, match=r"nope07\.tif: image listed in uc_merced-train\.txt not found"
    ):
        _ds(_task(root, "classification", "ucmerced"))
    seg = _seg_folders(tmp_path / "seg")
    (seg / "train" / "masks" / "t1.tif").unlink()
    with pytest.raises(
        DatasetNotFoundError, match=r"train/masks/t1\.\*: counterpart of .*images/t1\.tif not found"
    ):
        _ds(_task(seg, "segmentation", "folders", num_classes=4))
    ben = _bigearthnet(tmp_path / "ben", {"p1": ["Pastures"]})
    (ben / "BigEarthNet-v1.0" / "p1" / "p1_B03.tif").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"p1_B03\.tif: band file not found"):
        _ds(_task(ben, "multilabel", "bigearthnet"))[0]


def test_band_count_must_match_the_normalisation(tmp_path):
    ds = _ds(
        _task(_seg_folders(tmp_path), "segmentation", "folders", num_classes=4)
    )  # 6 bands, 3 mean values
    with pytest.raises(ConfigError, match=r"6 bands but the backbone's mean/std has 3 values; .*bands"):
        ds[0]


def test_label_subset_is_seeded_and_sized():
    a = label_subset(1000, 0.01, seed=42)
    assert len(a) == 10 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, label_subset(1000, 0.01, seed=42))
    assert not np.array_equal(a, label_subset(1000, 0.01, seed=1))
    assert len(label_subset(1000, 0.1, 0)) == 100 and len(label_subset(5, 0.01, 0)) == 1
    np.testing.assert_array_equal(label_subset(7, 1.0, 0), np.arange(7))


def test_flip_augmentation_flips_image_and_mask_together(tmp_path):
    cfg = _task(
        _seg_folders(tmp_path, img_size=SIZE),
        "segmentation",
        "folders",
        bands=(3, 2, 1),
        value_range=(0, 255),
        num_classes=4,
    )
    plain, aug = _ds(cfg), _ds(cfg, train=True)
    torch.manual_seed(0)
    samples = [aug[0] for _ in range(8)]
    ref = plain[0]
    flipped = [s for s in samples if not torch.equal(s["mask"], ref["mask"])]
    assert 0 < len(flipped) < 8
    for s in flipped:
        assert torch.equal(s["mask"], ref["mask"].flip(-1)) and torch.equal(s["image"], ref["image"].flip(-1))
