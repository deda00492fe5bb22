"""Every task head on real labelled samples (``samples/``: GEO-Bench-2's unit-test rows of BigEarthNet v2,
TreeSatAI and FLAIR-2, see samples/LICENSES.md), read through the task readers and fine-tuned for a few steps.

BigEarthNet v2 and TreeSatAI are read with the ``geobench`` layout (multi-label; TreeSatAI's dominant genus for
classification), FLAIR-2 with the ``folders`` layout (segmentation). Bands are chosen by name from the files'
band descriptions. There is no real change-detection or super-resolution set here, so those two heads run on sets
*derived* from real FLAIR-2 imagery, written to tmp_path: change pairs are a real image and the same image with
the pixels of one FLAIR class region replaced by another real image's pixels (label = that region); super-resolution
pairs are a real image (HR) and its 4 x 4 block-mean copy (LR). The checks compare every sample with the files.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from gfm_core.config import BackboneSpec, FinetuneCfg, TaskCfg, parse_params
from gfm_core.data.raster.header import inspect_image
from gfm_core.data.tasks.dataset import TaskDataset
from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.evaluation.results import load_result, load_scores
from gfm_core.stages.finetune import finetune
from gfm_core.task_heads import HEADS

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
RGB = ("red", "green", "blue")
SIZE, STEPS = 32, 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_SWIN = BackboneSpec(
    name="tiny", kind="random", arch="swin_tiny_patch4_window7_224",
    timm_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4),
)


def _read(path: Path, indexes: tuple[int, ...] | int = (1, 2, 3)) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(indexes)


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding (far below one 8-bit step, 1/255)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def _label_rows(name: str) -> dict[str, dict[str, str]]:
    with (SAMPLES / name / "labels.csv").open(newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _flair_classes() -> tuple[int, ...]:
    return tuple(sorted(int(k) for k in json.loads((SAMPLES / "flair2" / "classes.json").read_text())["masks"]))


def _task(name: str, head: str, layout: str, root: Path, **kw) -> TaskCfg:
    return TaskCfg(name=name, head=head, layout=layout, root=root, img_size=SIZE, band_names=RGB, **kw)


# ------------------------------------------------------------------------------------- derived change/superres


def _write_like(src_path: Path, dst: Path, data: np.ndarray, factor: int = 1) -> None:
    """``data`` as a GeoTIFF with ``src_path``'s CRS and band names (pixel size x ``factor``)."""
    with rasterio.open(src_path) as src:
        profile, names = src.profile.copy(), src.descriptions
        transform = src.transform @ src.transform.scale(factor, factor)
    profile.update(height=data.shape[-2], width=data.shape[-1], count=data.shape[0], dtype=str(data.dtype),
                   transform=transform)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
        out.descriptions = names[: data.shape[0]]


def _region(mask: np.ndarray) -> np.ndarray:
    """The pixels of the FLAIR class whose share of the image is closest to a quarter."""
    counts = np.bincount(mask.ravel())
    cls = min(np.flatnonzero(counts), key=lambda c: abs(counts[c] / mask.size - 0.25))
    return mask == cls


def _change_from_flair(root: Path) -> Path:
    """A = a real FLAIR image; B = A with one class region (its own mask) replaced by the next image's pixels."""
    for split, donors in (("train", None), ("test", "val")):
        images = sorted((SAMPLES / "flair2" / split / "images").glob("*.tif"))
        for i, a_path in enumerate(images):
            donor = sorted((SAMPLES / "flair2" / donors / "images").glob("*.tif"))[0] if donors else \
                images[(i + 1) % len(images)]
            a, d = _read(a_path, tuple(range(1, 6))), _read(donor, tuple(range(1, 6)))
            region = _region(_read(SAMPLES / "flair2" / split / "masks" / a_path.name, 1))
            _write_like(a_path, root / split / "A" / a_path.name, a)
            _write_like(a_path, root / split / "B" / a_path.name, np.where(region, d, a))
            _write_like(a_path, root / split / "label" / a_path.name, (region * 255).astype(np.uint8)[None])
    return root


def _superres_from_flair(root: Path, scale: int = 4) -> Path:
    """HR = a real FLAIR image (all bands), LR = its ``scale`` x ``scale`` block mean, rounded to uint8."""
    for split in ("train", "test"):
        for hr_path in sorted((SAMPLES / "flair2" / split / "images").glob("*.tif")):
            hr = _read(hr_path, tuple(range(1, 6)))
            c, h, w = hr.shape
            lr = hr.reshape(c, h // scale, scale, w // scale, scale).mean((2, 4)).round().astype(np.uint8)
            _write_like(hr_path, root / split / "hr" / hr_path.name, hr)
            _write_like(hr_path, root / split / "lr" / hr_path.name, lr, factor=scale)
    return root


# ------------------------------------------------------------------------------------- tasks and their checks


def _tasks(head: str, tmp: Path) -> list[TaskCfg]:
    if head == "classification":  # TreeSatAI's dominant genus (largest label_area_fraction)
        return [_task("treesatai_cls", head, "geobench", SAMPLES / "treesatai")]
    if head == "multilabel":
        return [_task(n, head, "geobench", SAMPLES / n) for n in ("benv2", "treesatai")]
    if head == "segmentation":
        return [_task("flair2", head, "folders", SAMPLES / "flair2", mask_values=_flair_classes())]
    if head == "change":
        return [_task("flair2_change", head, "folders", _change_from_flair(tmp / "change"))]
    if head == "superres":
        return [_task("flair2_sr", head, "folders", _superres_from_flair(tmp / "sr"), scale=4)]
    raise AssertionError(f"head {head!r} has no real-sample task in this file: add one")


def _check_classification(ds: TaskDataset, i: int) -> None:
    row = _label_rows("treesatai")[ds.refs[i].id]
    idx, frac = [int(v) for v in row["label_idx"].split()], [float(v) for v in row["label_area_fraction"].split()]
    s = ds[i]
    assert s["label"].dtype == torch.long and int(s["label"]) == idx[int(np.argmax(frac))]
    _same(ds._raw(i)["image"], _read(ds.refs[i].files["image"], (4, 2, 3)) / 255)


def _check_multilabel(ds: TaskDataset, i: int) -> None:
    row = _label_rows(ds.cfg.root.name)[ds.refs[i].id]
    expected = np.zeros(len(ds.classes), np.float32)
    expected[[int(v) for v in row["label_idx"].split()]] = 1
    s = ds[i]
    assert s["label"].dtype == torch.float32 and s["label"].tolist() == expected.tolist()
    assert [ds.classes[j] for j in np.flatnonzero(expected)] == sorted(row["labels"].split("; "), key=ds.classes.index)


def _check_segmentation(ds: TaskDataset, i: int) -> None:
    ref = ds.refs[i]
    file_mask = _read(ref.files["mask"], 1)
    mapped = np.vectorize(ds.cfg.mask_values.index)(file_mask)  # type: ignore[union-attr]
    s = ds[i]
    assert s["mask"].dtype == torch.long and s["mask"].shape == file_mask.shape
    np.testing.assert_array_equal(s["mask"].numpy(), mapped)
    assert (s["mask"] != ds.cfg.ignore_index).all()  # FLAIR-2's 13 classes cover every pixel
    _same(ds._raw(i)["image"], _read(ref.files["image"]) / 255)


def _check_change(ds: TaskDataset, i: int) -> None:
    ref, raw = ds.refs[i], ds._raw(i)
    region = _read(ref.files["label"], 1) > 0
    a, b = raw["image"]
    assert 0 < region.mean() < 1 and ds[i]["image"].shape == (2, 3, SIZE, SIZE)
    np.testing.assert_array_equal(raw["mask"], region)
    _same(a, _read(SAMPLES / "flair2" / ds.split / "images" / ref.files["A"].name) / 255)
    np.testing.assert_array_equal(a[:, ~region], b[:, ~region])
    assert not np.array_equal(a[:, region], b[:, region])


def _check_superres(ds: TaskDataset, i: int) -> None:
    ref, s = ds.refs[i], ds[i]
    hr = _read(SAMPLES / "flair2" / ds.split / "images" / ref.files["hr"].name)
    assert s["image"].shape == (3, SIZE, SIZE) and s["target"].shape == (3, 512, 512)
    _same(s["target"].numpy(), hr / 255)
    lr = ds._raw(i)["image"] * 255
    np.testing.assert_allclose(lr, hr.reshape(3, 128, 4, 128, 4).mean((2, 4)), atol=0.5 + 1e-4)


CHECKS: dict[str, Callable[[TaskDataset, int], None]] = {
    "classification": _check_classification,
    "multilabel": _check_multilabel,
    "segmentation": _check_segmentation,
    "change": _check_change,
    "superres": _check_superres,
}


def _cfg(out: Path) -> FinetuneCfg:
    return FinetuneCfg(batch_size=2, eval_batch_size=4, epochs=10, warmup_epochs=1, max_steps=STEPS, base_lr=1e-3,
                       drop_path_rate=0.0, decoder_dim=8, device="cpu", num_workers=0, log_every=1, out_dir=out)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_head_reads_and_finetunes_on_real_samples(head, tmp_path):
    for task in _tasks(head, tmp_path):
        for split in ("train", "test"):
            ds = TaskDataset(task, split, mean=MEAN, std=STD)
            for i in range(len(ds)):
                s = ds[i]
                assert s["image"].dtype == torch.float32 and torch.isfinite(s["image"]).all()
                assert s["image"].shape[-3:] == (3, SIZE, SIZE) and s["id"] == ds.refs[i].id
                raw = ds._raw(i)["image"]
                assert raw.min() >= 0 and raw.max() <= 1 and raw.max() > raw.min()
                CHECKS[head](ds, i)
        res = finetune(_cfg(tmp_path), task, TINY_SWIN, seed=0, out_dir=tmp_path / "ft" / task.name)
        assert res.steps == STEPS and res.test_samples == len(ds) and math.isfinite(res.score)
        assert all(math.isfinite(v) for v in res.metrics.values()), res.metrics
        assert all(math.isfinite(h["loss"]) for h in res.history)
        assert load_result(res.out_dir) == res
        assert load_scores(res.scores)[0] == [r.id for r in ds.refs]


# ------------------------------------------------------------------------------------------- bands by name


def test_treesatai_band_names_read_red_green_blue_not_its_file_order():
    """TreeSatAI stores NIR, G, B, R: [red, green, blue] must read file bands (4, 2, 3), never false colour."""
    root = SAMPLES / "treesatai"
    path = root / "train" / "sample_2349.tif"
    with rasterio.open(path) as src:
        assert src.descriptions == ("nir", "green", "blue", "red")
    by_name = TaskDataset(_task("t", "multilabel", "geobench", root), "train", mean=MEAN, std=STD)
    i = [r.id for r in by_name.refs].index("sample_2349")
    _same(by_name._raw(i)["image"], _read(path, (4, 2, 3)) / 255)
    by_index = TaskCfg(name="t", head="multilabel", layout="geobench", root=root, img_size=SIZE, bands=(4, 2, 3))
    np.testing.assert_array_equal(by_name._raw(i)["image"], TaskDataset(by_index, "train", mean=MEAN, std=STD)._raw(i)
                                  ["image"])
    false_colour = by_name.cfg.model_copy(update={"band_names": ("NIR", "Green", "Blue")})  # case-insensitive
    _same(TaskDataset(false_colour, "train", mean=MEAN, std=STD)._raw(i)["image"], _read(path, (1, 2, 3)) / 255)


def test_a_missing_band_name_names_the_file_the_wanted_and_the_found_bands():
    cfg = _task("t", "multilabel", "geobench", SAMPLES / "treesatai").model_copy(
        update={"band_names": ("red", "green", "swir16")}
    )
    ds = TaskDataset(cfg, "test", mean=MEAN, std=STD)
    with pytest.raises(DataValidationError) as err:
        ds[0]
    msg = str(err.value)
    assert str(ds.refs[0].files["image"]) in msg and "band(s) ['swir16'] not found" in msg
    assert "wanted band_names ['red', 'green', 'swir16']" in msg
    assert "band descriptions are ['nir', 'green', 'blue', 'red']" in msg


def test_bands_and_band_names_together_is_a_config_error():
    task = {"name": "t", "head": "multilabel", "layout": "geobench", "root": "samples/benv2", "img_size": 32}
    with pytest.raises(ConfigError, match=r"task 't': give bands \(indexes\) or band_names, not both"):
        parse_params({"finetune": {"tasks": [{**task, "bands": [4, 3, 2], "band_names": ["red", "green", "blue"]}]}})
    with pytest.raises(ConfigError, match="layout 'bigearthnet' reads one file per band: use band_files"):
        parse_params({"finetune": {"tasks": [{**task, "layout": "bigearthnet", "band_names": ["red"]}]}})


def test_benv2_band_codes_and_common_names_select_the_same_bands():
    """BigEarthNet v2 describes its bands by Sentinel-2 code; common names (STAC eo) find them too."""
    root = SAMPLES / "benv2"
    ds = {names: TaskDataset(_task("b", "multilabel", "geobench", root).model_copy(update={"band_names": names}),
                             "val", mean=MEAN, std=STD)
          for names in (RGB, ("B04", "b03", "B02"))}
    expected = _read(ds[RGB].refs[0].files["image"], (4, 3, 2)) / 10000  # uint16: reflectance x 10000
    for d in ds.values():
        _same(d._raw(0)["image"], expected)
    nir = ds[RGB].cfg.model_copy(update={"band_names": ("nir", "nir08", "swir16")})
    _same(TaskDataset(nir, "val", mean=MEAN, std=STD)._raw(0)["image"],
          _read(ds[RGB].refs[0].files["image"], (8, 9, 11)) / 10000)


# ------------------------------------------------------------------------------- the README's quirks, and stats


def test_source_quirks_are_fixed_in_the_files():
    """samples/*/README quirks: BigEarthNet v2 S2 pixels are 10 m (the source said 60 m); FLAIR-2 masks carry the
    images' CRS and grid again."""
    for path in sorted((SAMPLES / "benv2").glob("*/*.tif")):
        assert inspect_image(path).gsd == pytest.approx(10.0), path
    assert {b["gsd_m"] for b in json.loads((SAMPLES / "benv2" / "bands.json").read_text())["s2 ({split}/<id>.tif)"]} \
        == {10}
    for mask in sorted((SAMPLES / "flair2").glob("*/masks/*.tif")):
        m, im = inspect_image(mask), inspect_image(mask.parent.parent / "images" / mask.name)
        assert m.crs == im.crs == "EPSG:2154" and m.transform == im.transform, mask


def test_read_values_match_the_samples_stats():
    """The readers' pixels and labels reproduce stats.json's per-band ranges and FLAIR's class pixel counts."""
    stats = json.loads((SAMPLES / "flair2" / "stats.json").read_text())
    seg = TaskCfg(name="f", head="segmentation", layout="folders", root=SAMPLES / "flair2", img_size=SIZE,
                  band_names=("red", "green", "blue", "nir", "elevation"), mask_values=_flair_classes())
    images = []
    for split in ("train", "val", "test"):
        ds = TaskDataset(seg, split, mean=(0,) * 5, std=(1,) * 5)
        masks = np.concatenate([ds._raw(i)["mask"].ravel() for i in range(len(ds))])
        counts = {str(c): int(n) for c, n in enumerate(np.bincount(masks)) if n}
        assert counts == stats["class_pixel_counts_by_split"][split]
        images += [ds._raw(i)["image"] for i in range(len(ds))]
    for b, (name, s) in enumerate(stats["modalities"]["images"]["per_band"].items()):
        values = np.concatenate([im[b].ravel() for im in images]) * 255
        assert (values.min(), values.max()) == pytest.approx((s["min"], s["max"]), abs=1e-3), name
    ben = json.loads((SAMPLES / "benv2" / "stats.json").read_text())["modalities"]["s2"]["per_band"]
    cfg = TaskCfg(name="b", head="multilabel", layout="geobench", root=SAMPLES / "benv2", img_size=SIZE,
                  band_names=tuple(ben))
    arrays = [d._raw(i)["image"] for d in (TaskDataset(cfg, sp, mean=(0,) * 12, std=(1,) * 12)
                                           for sp in ("train", "val", "test")) for i in range(len(d))]
    for b, (name, s) in enumerate(ben.items()):
        values = np.concatenate([a[b].ravel() for a in arrays]) * 10000
        assert (values.min(), values.max()) == pytest.approx((s["min"], s["max"]), abs=1e-2), name
