"""Read one image (GeoTIFF, JPEG, PNG, anything GDAL opens) into a scaled float array, or say plainly why not.

Every format goes through rasterio, so a GeoTIFF, a JPEG and a PNG come back in the same form:

- ``array``: float32 ``[C, H, W]`` in ``[0, 1]``; nodata pixels are 0.
- ``valid``: bool ``[H, W]``, False where the pixel is nodata (declared nodata value in every selected band,
  an alpha band or internal mask, or NaN/Inf when that is allowed).
- ``info``: the header (:class:`RasterInfo`): size, bands, dtype, CRS, transform, GSD in metres, nodata.

Scaling rule (``value_range=None``; an explicit ``value_range=(lo, hi)`` always wins):

======================  ==============  ================================================================
file dtype              default range   why
======================  ==============  ================================================================
uint8                   0 .. 255        8-bit imagery (NAIP, every GeoPile JPEG/PNG)
uint16, int16,          0 .. 10000      surface reflectance x 10000 (Sentinel-2 L2A, Landsat C2 style);
uint32, int32                           12-bit DN (0..4095) reads darker, 16-bit DN (0..65535) saturates:
                                        give those sources a ``value_range``
float32, float64        0 .. 1          floats are taken to be reflectance already
======================  ==============  ================================================================

``x -> (x - lo) / (hi - lo)``, then clipped to ``[0, 1]``. The share of valid samples that had to be
clipped is returned as ``saturated_fraction``, so a wrong range shows up in the manifest instead of silently.
Other dtypes (int8, int64, uint64, complex) are refused.

Failures raise :class:`~gfm_core.errors.RasterReadError` with the path and a plain reason; the path and header
checks (:mod:`~gfm_core.data.raster.header`) run before any pixel is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags

from gfm_core.data.raster.header import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_VALUE_RANGES,
    GDAL_ENV,
    RasterInfo,
    check_header,
    check_path,
    gdal_message,
    open_raster,
    raster_info,
)
from gfm_core.errors import ConfigError, RasterReadError

DEFAULT_MIN_SIZE = 8
"""Smallest accepted width and height in pixels for :func:`read_image` (ingestion uses a larger floor)."""


@dataclass(frozen=True)
class RasterImage:
    """A decoded image.

    Attributes:
        array: float32 ``[C, H, W]`` in ``[0, 1]``; pixels where ``valid`` is False are 0.
        valid: bool ``[H, W]``, True where the pixel holds data.
        info: the file's header.
        bands: the 1-based band indexes that make up ``array``'s channels, in order.
        value_range: the ``(lo, hi)`` that was mapped to ``[0, 1]``.
        saturated_fraction: share of valid samples outside ``value_range`` before clipping.
    """

    array: np.ndarray
    valid: np.ndarray
    info: RasterInfo
    bands: tuple[int, ...]
    value_range: tuple[float, float]
    saturated_fraction: float

    @property
    def nodata_fraction(self) -> float:
        """Share of pixels that are not valid."""
        return 1.0 - float(self.valid.mean())



def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f"value_range must be two finite numbers with lo < hi, got {value_range!r}")
    return lo, hi


def read_image(
    path: str | Path,
    *,
    bands: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    expected_bands: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    data_root: str | Path | None = None,
    allow_nonfinite: bool = False,
) -> RasterImage:
    """Read an image as float32 ``[C, H, W]`` in ``[0, 1]`` with a validity mask and its header.

    Args:
        path: GeoTIFF, JPEG, PNG, or any single-image format GDAL reads.
        bands: 1-based band indexes to return, in this order (``(3, 2, 1)`` swaps BGR to RGB). None = every
            band except alpha bands (those feed the valid mask instead).
        value_range: ``(lo, hi)`` mapped to ``[0, 1]``; None = the dtype's default (module docstring).
        expected_bands: when set, the file must have exactly this many bands.
        max_pixels: refuse files whose header claims more than this many samples (``width*height*bands``).
        min_size: refuse images narrower or shorter than this many pixels.
        data_root: when set, refuse paths whose real location (after symlinks) is outside this folder.
        allow_nonfinite: treat NaN/Inf pixels as nodata instead of failing. NaN is always nodata when the
            file declares ``nodata=nan``.

    Returns:
        The decoded :class:`RasterImage`.

    Raises:
        RasterReadError: the file is missing, unreadable, not a raster, truncated, too small, too large,
            of an unsupported dtype or band count, entirely nodata, or holds undeclared NaN/Inf values.
        ConfigError: ``bands`` or ``value_range`` is malformed (a caller error, not the file's).
    """
    if bands is not None:
        bands = tuple(int(b) for b in bands)
        if not bands or min(bands) < 1:
            raise ConfigError(f"bands must be a non-empty sequence of 1-based band indexes, got {bands!r}")
    if value_range is not None:
        value_range = _check_value_range(value_range)
    path = check_path(path, data_root)
    with rasterio.Env(**GDAL_ENV), open_raster(path) as src:
        info = raster_info(path, src)
        check_header(info, min_size=min_size, max_pixels=max_pixels, expected_bands=expected_bands)
        if bands is None:
            bands = tuple(b for b in range(1, info.count + 1) if b not in info.alpha_bands) or tuple(
                range(1, info.count + 1)
            )
        elif max(bands) > info.count:
            raise RasterReadError(path, f"band {max(bands)} requested but the file has {info.count} band(s)")
        try:
            raw = src.read(indexes=list(bands))
            flags = src.mask_flag_enums[bands[0] - 1]
            mask = None
            if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
                mask = src.read_masks(bands[0]) > 0  # alpha band or internal/external dataset mask
        except Exception as e:  # rasterio/GDAL read failures: short strips, bad compression streams
            raise RasterReadError(path, f"truncated or corrupt pixel data (GDAL: {gdal_message(e)})") from e
    return _decode(path, info, raw, mask, bands, value_range, allow_nonfinite)


def _decode(
    path: Path,
    info: RasterInfo,
    raw: np.ndarray,
    mask: np.ndarray | None,
    bands: tuple[int, ...],
    value_range: tuple[float, float] | None,
    allow_nonfinite: bool,
) -> RasterImage:
    valid = np.ones(raw.shape[1:], dtype=bool) if mask is None else mask.copy()
    nodata = info.nodata
    nodata_is_nan = nodata is not None and math.isnan(nodata)
    if nodata is not None and not nodata_is_nan and _representable(nodata, raw.dtype):
        valid &= ~np.all(raw == nodata, axis=0)  # GDAL's rule: a pixel is nodata when every band is
    if raw.dtype.kind == "f":
        nan, inf = np.isnan(raw), np.isinf(raw)
        if nodata_is_nan:
            nan_px = nan.all(axis=0)
            valid &= ~nan_px
            nan = nan & ~nan_px  # NaN in only some bands is still a bad value
        bad_px = np.any(nan | inf, axis=0) & valid
        if bad_px.any():
            if not allow_nonfinite:
                raise RasterReadError(
                    path,
                    f"{int(nan[:, bad_px].sum())} NaN and {int(inf[:, bad_px].sum())} Inf pixel value(s) "
                    f"where the file declares no NaN nodata (declare nodata=nan, clean the file, or read "
                    f"with allow_nonfinite=True)",
                )
            valid &= ~bad_px
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise RasterReadError(path, f"all {valid.size} pixels are nodata")
    lo, hi = value_range if value_range is not None else DEFAULT_VALUE_RANGES[info.dtype]
    work_dtype: type[np.floating[Any]] = np.float64 if raw.dtype.itemsize > 2 else np.float32
    scaled = (raw.astype(work_dtype) - lo) / (hi - lo)
    inside = scaled[:, valid]
    saturated = float(np.count_nonzero((inside < 0) | (inside > 1))) / inside.size
    array = np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)
    array[:, ~valid] = 0.0
    return RasterImage(
        array=np.ascontiguousarray(array),
        valid=valid,
        info=info,
        bands=bands,
        value_range=(lo, hi),
        saturated_fraction=saturated,
    )


def _representable(value: float, dtype: np.dtype) -> bool:
    """True when ``value`` can occur in an array of ``dtype`` (a uint8 file can't hold nodata=-9999)."""
    if dtype.kind in "ui":
        lim = np.iinfo(dtype)
        return float(value).is_integer() and lim.min <= value <= lim.max
    return True
