"""Tiny real rasters for tests, written with rasterio (no committed binaries)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

# value written for 1.0 of the pattern: the readers' default full-scale value for each dtype
FULL_SCALE = {
    "uint8": 255,
    "uint16": 10000,
    "int16": 10000,
    "uint32": 10000,
    "int32": 10000,
    "float32": 1.0,
    "float64": 1.0,
}
DRIVERS = {".tif": "GTiff", ".tiff": "GTiff", ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def pattern(bands: int, size: int | tuple[int, int], seed: int) -> np.ndarray:
    """A smooth, seed-specific image in [0.05, 0.95], float64 [C, H, W] (perceptual hashes need structure)."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.zeros((bands, h, w))
    for c in range(bands):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 3.0, 2)
            px, py = rng.uniform(0, 2 * np.pi, 2)
            out[c] += (
                rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * fx * x + px) * np.cos(2 * np.pi * fy * y + py)
            )
    out -= out.min(axis=(1, 2), keepdims=True)
    out /= out.max(axis=(1, 2), keepdims=True) + 1e-12
    return 0.05 + 0.9 * out


def to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Scale a [0, 1] pattern to the dtype's full-scale value."""
    scaled = values * FULL_SCALE[dtype]
    return (np.round(scaled) if np.dtype(dtype).kind in "ui" else scaled).astype(dtype)


def make_geotiff(
    path: str | Path,
    bands: int = 3,
    size: int | tuple[int, int] = 32,
    dtype: str = "uint8",
    crs: str | None = "EPSG:32633",
    seed: int = 0,
    nodata: float | None = None,
    *,
    res: float = 10.0,
    origin: tuple[float, float] = (500000.0, 4600000.0),
    data: np.ndarray | None = None,
    **profile: object,
) -> Path:
    """Write a GeoTIFF (or JPEG/PNG, chosen by suffix) and return its path.

    ``data`` (``[C, H, W]`` in the file dtype) replaces the seeded pattern. ``crs=None`` writes no
    georeferencing. Extra keywords go to the rasterio profile.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = to_dtype(pattern(bands, size, seed), dtype)
    bands, h, w = data.shape
    prof: dict[str, object] = dict(
        driver=DRIVERS[path.suffix.lower()], width=w, height=h, count=bands, dtype=str(data.dtype)
    )
    if crs is not None:
        prof.update(crs=crs, transform=Affine(res, 0.0, origin[0], 0.0, -res, origin[1]))  # north-up
    if nodata is not None:
        prof["nodata"] = nodata
    if prof["driver"] == "GTiff":
        prof["photometric"] = "MINISBLACK"  # plain bands: GDAL would otherwise flag a 4th uint8 band as alpha
    prof.update(profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(data)
    for aux in path.parent.glob(path.name + ".aux.xml"):
        aux.unlink()
    return path


def make_photo(
    path: str | Path, size: int | tuple[int, int] = 32, seed: int = 0, bands: int = 3, **kw: object
) -> Path:
    """A non-georeferenced uint8 JPEG/PNG (by suffix) of the seeded pattern."""
    return make_geotiff(path, bands=bands, size=size, dtype="uint8", crs=None, seed=seed, **kw)
