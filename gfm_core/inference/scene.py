"""A scene opened for tiled inference: its header, the band contract applied, windows read one at a time.

Nothing reads the whole scene: :meth:`Scene.read` decodes one window (``src.read(window=...)``), so memory
depends on the tile, not on the scene. Validity follows :mod:`gfm_core.data.raster.reader`: a pixel is nodata
when every selected band equals the declared nodata value, when the dataset mask (alpha band, internal mask)
says so, or when it is NaN/Inf; nodata pixels read as 0 in ``[0, 1]`` units. GDAL's block cache, which
otherwise grows to 5 % of RAM as a large scene is read, is capped at :data:`GDAL_CACHE_MB` while a scene is
open (it must hold one row of the file's blocks for tiles to reuse them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags

from gfm_core.data.raster.header import GDAL_ENV, check_path, gdal_message, open_raster
from gfm_core.errors import DataValidationError, RasterReadError
from gfm_core.inference.bands import BandContract, select_bands, value_range_for
from gfm_core.inference.tiles import Tile

GDAL_CACHE_MB = 256


@dataclass(frozen=True)
class Window01:
    """One decoded window: ``x01`` float32 ``[C, h, w]`` in ``[0, 1]`` (0 at nodata), ``valid`` bool ``[h, w]``."""

    x01: np.ndarray
    valid: np.ndarray


class Scene:
    """An open raster with the contract's bands chosen (:func:`gfm_core.inference.bands.select_bands`).

    Use as a context manager. Attributes: ``path``, ``height``, ``width``, ``crs`` (rasterio CRS or None),
    ``transform``, ``bands`` (1-based, in the contract's order), ``value_range``, ``nodata``.
    """

    def __init__(self, path: str | Path, contract: BandContract, *, bands: Sequence[int] | None = None,
                 band_names: Sequence[str] | None = None, value_range: Sequence[float] | None = None) -> None:
        self.path = check_path(path)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(rasterio.Env(**GDAL_ENV, GDAL_CACHEMAX=GDAL_CACHE_MB))
        try:
            self.src: Any = self._stack.enter_context(open_raster(self.path))
            src = self.src
            dtypes = set(src.dtypes)
            if len(dtypes) != 1:
                raise RasterReadError(self.path, f"bands have different data types ({sorted(dtypes)})")
            self.bands = select_bands(self.path, contract, int(src.count), tuple(src.descriptions), bands=bands,
                                      band_names=band_names)
            self.value_range = value_range_for(src.dtypes[0], value_range)
        except BaseException:
            self._stack.close()
            raise
        self.height, self.width = int(src.height), int(src.width)
        self.crs = src.crs
        self.transform: Affine = src.transform
        self.nodata = None if src.nodata is None else float(src.nodata)
        flags = src.mask_flag_enums[self.bands[0] - 1]
        self._dataset_mask = MaskFlags.per_dataset in flags or MaskFlags.alpha in flags

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._stack.close()

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` of the scene in its CRS."""
        return window_bounds(self.transform, 0, 0, self.height, self.width)

    def read(self, tile: Tile) -> Window01:
        """Decode ``tile``'s window (selected bands, scaled, nodata masked).

        Raises:
            RasterReadError: GDAL fails to read the window (truncated or corrupt data).
        """
        try:
            raw = self.src.read(indexes=list(self.bands), window=tile.window)
            valid = (self.src.read_masks(self.bands[0], window=tile.window) > 0) if self._dataset_mask \
                else np.ones(raw.shape[1:], bool)
        except Exception as e:  # rasterio/GDAL read failures
            raise RasterReadError(self.path, f"cannot read window {tile.window} ({gdal_message(e)})") from e
        nodata = self.nodata
        if nodata is not None and not math.isnan(nodata):
            valid &= ~np.all(raw == nodata, axis=0)
        if raw.dtype.kind == "f":
            valid &= np.all(np.isfinite(raw), axis=0)
        lo, hi = self.value_range
        x01 = np.clip((raw.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
        x01[:, ~valid] = 0.0
        return Window01(x01, valid)


def window_bounds(transform: Affine, y: int, x: int, h: int, w: int) -> tuple[float, float, float, float]:
    """``(minx, miny, maxx, maxy)`` of the pixel window at ``(y, x)`` of size ``(h, w)`` (any axis orientation)."""
    xs, ys = zip(*(transform @ (c, r) for r, c in ((y, x), (y, x + w), (y + h, x), (y + h, x + w))), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def pad_to(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """``[C, h0, w0]`` -> ``[C, h, w]``, reflecting (edge-replicating when too short) past the bottom/right.

    Only scenes smaller than one tile need it; the plan keeps every other window inside the scene.

    Raises:
        DataValidationError: ``x`` larger than the target.
    """
    _, h0, w0 = x.shape
    if h0 > h or w0 > w:
        raise DataValidationError(f"window {h0}x{w0} larger than the tile {h}x{w}")
    if (h0, w0) == (h, w):
        return x
    widths = ((0, 0), (0, h - h0), (0, w - w0))
    if h - h0 < h0 and w - w0 < w0:
        return np.pad(x, widths, mode="reflect")
    return np.pad(x, widths, mode="edge")
