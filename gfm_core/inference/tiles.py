"""A tiling plan over a scene of any size, and the blending weight that averages overlapping tiles without seams.

Windows are ``tile x tile`` pixels at a stride of ``tile - overlap``; the last window of each row and column is
shifted back so that it ends on the scene's edge (it overlaps its neighbour more, it never reads past the
scene). A scene smaller than one tile in a direction gets one window of the scene's size there (the batch
pads it; :mod:`~gfm_core.inference.scene`).

The weight of a tile is separable, ``w(y, x) = r(y) r(x)``: ``r`` rises as a raised cosine over the first
``overlap`` pixels, is 1 in the middle and falls over the last ``overlap`` pixels; it is never 0 (it starts at
``sin^2(pi/2 * 0.5 / overlap)``), so every pixel a tile covers has weight, and ``sum(w * pred) / sum(w)`` is
exact wherever the tiles agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from gfm_core.errors import ConfigError


@dataclass(frozen=True)
class Tile:
    """One window of a plan: grid position ``(row, col)``, pixel offsets ``(y, x)`` and size ``(h, w)``."""

    row: int
    col: int
    y: int
    x: int
    h: int
    w: int

    @property
    def window(self) -> Window:
        """The rasterio window (``src.read(window=...)``)."""
        return Window(self.x, self.y, self.w, self.h)


def offsets(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` px at ``stride`` covering ``[0, length)``; the last ends at ``length``.

    Raises:
        ConfigError: a non-positive length, tile or stride.
    """
    if length < 1 or tile < 1 or stride < 1:
        raise ConfigError(f"tiling needs length, tile and stride >= 1, got {length}, {tile}, {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # shifted back inside the scene
    return starts


@dataclass(frozen=True)
class TilePlan:
    """Windows covering a ``height x width`` scene (module docstring), in row-major order.

    Attributes:
        height, width: the scene's size in pixels.
        tile: the model's input size (windows are ``min(tile, height) x min(tile, width)``).
        overlap: pixels shared by neighbouring windows (at least; the last ones may share more).
        ys, xs: the windows' top and left offsets.
    """

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def tile_h(self) -> int:
        """Window height (the tile, or the scene's height when it is smaller)."""
        return min(self.tile, self.height)

    @property
    def tile_w(self) -> int:
        """Window width (the tile, or the scene's width when it is smaller)."""
        return min(self.tile, self.width)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the grid."""
        return len(self.ys), len(self.xs)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def row(self, r: int) -> list[Tile]:
        """The tiles of grid row ``r``, left to right."""
        return [Tile(r, c, self.ys[r], x, self.tile_h, self.tile_w) for c, x in enumerate(self.xs)]

    def __iter__(self) -> Iterator[Tile]:
        for r in range(len(self.ys)):
            yield from self.row(r)


def plan_tiles(height: int, width: int, tile: int, overlap: int = 0) -> TilePlan:
    """The plan of ``tile``-px windows sharing ``overlap`` px over a ``height x width`` scene.

    Raises:
        ConfigError: ``overlap`` not in ``[0, tile / 2]`` (the weight ramps over ``overlap`` px at both ends of
            a tile), or a bad size.
    """
    if tile < 1:
        raise ConfigError(f"tile must be >= 1 pixel, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ConfigError(f"overlap must be in [0, tile/2] = [0, {tile // 2}] pixels, got {overlap}")
    stride = tile - overlap
    return TilePlan(height, width, tile, overlap, tuple(offsets(height, tile, stride)),
                    tuple(offsets(width, tile, stride)))


def ramp(length: int, overlap: int) -> np.ndarray:
    """The 1-D blending profile: raised cosine over ``overlap`` px at both ends, 1 between, never 0 (float64)."""
    r = np.ones(length, dtype=np.float64)
    n = min(overlap, length // 2)
    if n > 0:
        rise = np.sin(0.5 * math.pi * (np.arange(n) + 0.5) / n) ** 2
        r[:n] = rise
        r[length - n:] = rise[::-1]
    return r


def blend_weight(h: int, w: int, overlap: int) -> np.ndarray:
    """The separable weight ``[h, w]`` (float32) of a tile: ``ramp(h) x ramp(w)``."""
    return np.outer(ramp(h, overlap), ramp(w, overlap)).astype(np.float32)
