"""Blend tile outputs in a strip of rows and write the finished rows to a GeoTIFF as soon as no tile can touch them.

Tiles arrive in row-major order. The strip holds ``sum(w * out)`` and ``sum(w)`` for the output rows from the
first unwritten row down to the bottom of the last tile added; when every tile of a grid row is in, the rows
above the next grid row's top are final: they are divided, turned into the output values and written (in whole
GeoTIFF block rows, so a compressed block is written once), then dropped from the strip. Memory is about
``(tile + block) x width x (K + 1)`` float32: flat in the scene's height, linear in its width (a
scene 50,000 px wide with 10 classes and 64-px tiles: about 0.7 GB).

Pixels no valid tile covered (nodata, skipped tiles) are written as the output's nodata value.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from gfm_core.errors import ConfigError
from gfm_core.io import durable_replace, temp_prefix

Output = Literal["classes", "probabilities", "values"]
BLOCK = 256
CLASS_NODATA = 255


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of ``[K, h, w]``."""
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


class StripWriter:
    """Accumulates weighted tile outputs ``[K, h, w]`` and writes ``out`` (a GeoTIFF) atomically on close.

    ``output``: ``classes`` (argmax of the blended softmax, uint8, nodata 255), ``probabilities`` (blended
    softmax, float32, nodata NaN) or ``values`` (the blended raw output, float32, nodata NaN).
    """

    def __init__(self, out: str | Path, *, height: int, width: int, channels: int, output: Output,
                 crs: Any, transform: Affine) -> None:
        if output not in ("classes", "probabilities", "values"):
            raise ConfigError(f"output must be classes, probabilities or values, got {output!r}")
        if output == "classes" and channels > CLASS_NODATA:
            raise ConfigError(f"{channels} classes do not fit a uint8 class map with nodata {CLASS_NODATA}")
        self.out, self.output = Path(out), output
        self.height, self.width, self.channels = height, width, channels
        self.top = 0  # first output row not yet written
        self.acc = np.zeros((channels, 0, width), np.float32)
        self.wsum = np.zeros((0, width), np.float32)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f"{temp_prefix(self.out)}{os.urandom(4).hex()}.tif"
        classes = output == "classes"
        profile = {
            "driver": "GTiff", "height": height, "width": width, "count": 1 if classes else channels,
            "dtype": "uint8" if classes else "float32", "nodata": CLASS_NODATA if classes else float("nan"),
            "crs": crs, "transform": transform, "compress": "deflate", "tiled": True,
            "blockxsize": BLOCK, "blockysize": BLOCK, "BIGTIFF": "IF_SAFER",
        }
        self.dst: Any = rasterio.open(self.tmp, "w", **profile)

    def add(self, y: int, x: int, out: np.ndarray, weight: np.ndarray) -> None:
        """Add a tile's output ``[K, h, w]`` at output pixel ``(y, x)`` with ``weight [h, w]`` (0 = no data)."""
        k, h, w = out.shape
        if y < self.top:
            raise ConfigError(f"tile at row {y} arrives after rows up to {self.top} were written (order tiles by row)")
        need = y + h - self.top - self.wsum.shape[0]
        if need > 0:
            self.acc = np.concatenate([self.acc, np.zeros((k, need, self.width), np.float32)], axis=1)
            self.wsum = np.concatenate([self.wsum, np.zeros((need, self.width), np.float32)], axis=0)
        if self.output != "values":
            out = _softmax(out.astype(np.float32))
        r = y - self.top
        self.acc[:, r:r + h, x:x + w] += out * weight
        self.wsum[r:r + h, x:x + w] += weight

    def flush(self, final: int) -> None:
        """Write the output rows above ``final`` (no later tile touches them), in whole block rows."""
        end = self.height if final >= self.height else (final // BLOCK) * BLOCK
        n = end - self.top
        if n <= 0:
            return
        if self.wsum.shape[0] < n:  # rows no tile reached (all skipped): pad with no data
            pad = n - self.wsum.shape[0]
            self.acc = np.concatenate([self.acc, np.zeros((self.channels, pad, self.width), np.float32)], axis=1)
            self.wsum = np.concatenate([self.wsum, np.zeros((pad, self.width), np.float32)], axis=0)
        acc, wsum = self.acc[:, :n], self.wsum[:n]
        covered = wsum > 0
        mean = acc / np.where(covered, wsum, 1.0)
        if self.output == "classes":
            data = mean.argmax(axis=0).astype(np.uint8)[None]
            data[:, ~covered] = CLASS_NODATA
        else:
            data = mean.astype(np.float32)
            data[:, ~covered] = np.nan
        self.dst.write(data, window=Window(0, self.top, self.width, n))
        self.acc, self.wsum = self.acc[:, n:].copy(), self.wsum[n:].copy()
        self.top = end

    def close(self, ok: bool = True) -> None:
        """Write what is left, close, and move the file into place (``ok``); otherwise remove the temp file."""
        try:
            if ok:
                self.flush(self.height)
        finally:
            self.dst.close()
        if ok:
            durable_replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StripWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(ok=exc_type is None)
