"""The low-resolution embedding GeoTIFF: one pixel per tile of the embedding grid, one band per feature.

Pixel ``(r, c)`` holds the embedding of grid tile ``(r, c)``; the transform is the scene's scaled by the
stride, so pixel ``(r, c)`` covers the scene pixels from ``(r * stride, c * stride)``. Where the scene's size
is not a multiple of the stride, the last row and column of tiles were shifted back inside the scene
(:mod:`~gfm_core.inference.tiles`): their pixels lie up to one stride from the ground they describe (the
GeoParquet geometry is exact). Tiles that were skipped (all nodata) are NaN, the file's nodata. Rows are
written as the grid fills them, so only one grid row of vectors is held.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from gfm_core.io import durable_replace, temp_prefix


class GridWriter:
    """Writes ``[D, rows, cols]`` float32 embeddings row by row; moved into place atomically on a clean exit."""

    def __init__(self, out: str | Path, *, rows: int, cols: int, dim: int, crs: Any, transform: Affine,
                 stride: int) -> None:
        self.out, self.rows, self.cols, self.dim = Path(out), rows, cols, dim
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f"{temp_prefix(self.out)}{os.urandom(4).hex()}.tif"
        self.dst: Any = rasterio.open(
            self.tmp, "w", driver="GTiff", height=rows, width=cols, count=dim, dtype="float32", nodata=float("nan"),
            crs=crs, transform=transform @ Affine.scale(stride), interleave="pixel", compress="deflate",
            BIGTIFF="IF_SAFER",
        )
        self.row = 0
        self.buf = np.full((dim, 1, cols), np.nan, np.float32)

    def _write_until(self, row: int) -> None:
        while self.row < min(row, self.rows):
            self.dst.write(self.buf, window=Window(0, self.row, self.cols, 1))
            self.buf[:] = np.nan
            self.row += 1

    def add(self, row: int, col: int, vector: np.ndarray) -> None:
        """The embedding of grid tile ``(row, col)`` (tiles arrive in row-major order)."""
        self._write_until(row)
        self.buf[:, 0, col] = vector

    def __enter__(self) -> GridWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self._write_until(self.rows)
        finally:
            self.dst.close()
        if exc_type is None:
            durable_replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)
