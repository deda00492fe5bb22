"""The nearest tiles to a query tile, drawn as a PNG grid: the query first, then its neighbours by cosine.

The embeddings file says which scene, bands and value range it was made from (its ``gfm`` metadata); each tile
is read back from the scene through a rasterio window (``x``, ``y``, ``h``, ``w`` of its row), so the scene is
never read whole. One contrast stretch (2nd-98th percentile per band over the valid pixels of all drawn tiles) is
shared by every panel, so brightness compares across them; nodata is drawn light grey. The picture is exactly
``cols * cell`` by ``rows * (cell + TITLE_PX)`` pixels and is written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import rasterio
from rasterio.windows import Window

from gfm_core.errors import DataValidationError
from gfm_core.inference.similar import nearest, tile_record
from gfm_core.io import atomic_write

TITLE_PX = 18
NODATA_GREY = 0.85
DPI = 100


@dataclass(frozen=True)
class Gallery:
    """What :func:`similar_grid` drew: the PNG, its size, and the ``k + 1`` nearest tiles by cosine (``similarity``
    each; the query itself normally first)."""

    out: Path
    width: int
    height: int
    hits: list[dict[str, Any]]


def embedding_metadata(path: str | Path) -> dict[str, Any]:
    """The ``gfm`` metadata of an embeddings file (scene, bands, value range, tiling, model).

    Raises:
        DataValidationError: the file has none (not written by ``gfm embed``).
    """
    meta = pq.read_schema(path).metadata or {}
    if b"gfm" not in meta:
        raise DataValidationError(f"{path}: no 'gfm' metadata (not an embeddings file written by gfm embed)")
    return dict(json.loads(meta[b"gfm"]))


def _tiles(scene: Path, hits: list[dict[str, Any]], bands: list[int], value_range: list[float]) -> list[np.ndarray]:
    """Each hit's window as ``[h, w, C]`` float32 in ``[0, 1]`` of the value range, NaN where it is nodata."""
    lo, hi = value_range
    out = []
    with rasterio.open(scene) as src:
        for h in hits:
            window = Window(h["x"], h["y"], h["w"], h["h"])
            x = np.clip((src.read(indexes=bands, window=window).astype(np.float32) - lo) / (hi - lo), 0, 1)
            x[:, src.read_masks(bands[0], window=window) == 0] = np.nan
            out.append(x.transpose(1, 2, 0))
    return out


def _stretch(tiles: list[np.ndarray]) -> list[np.ndarray]:
    """One 2-98 % stretch per band over the valid pixels of all tiles; nodata light grey, one band grey."""
    stacked = np.concatenate([t.reshape(-1, t.shape[-1]) for t in tiles])
    stacked = stacked[np.isfinite(stacked).all(axis=1)]
    if not stacked.size:
        raise DataValidationError("every drawn tile is nodata")
    lo, hi = np.percentile(stacked, 2, axis=0), np.percentile(stacked, 98, axis=0)
    out = [np.nan_to_num(np.clip((t - lo) / np.maximum(hi - lo, 1e-6), 0, 1), nan=NODATA_GREY) for t in tiles]
    return [np.repeat(t, 3, axis=-1) if t.shape[-1] == 1 else t[..., :3] for t in out]


def similar_grid(embeddings: str | Path, out: str | Path, *, row: int, col: int, k: int = 8,
                 scene: str | Path | None = None, cell: int = 160, cols: int | None = None) -> Gallery:
    """Draw grid tile ``(row, col)`` and its ``k`` nearest tiles (cosine, itself excluded) into the PNG ``out``.

    Args:
        embeddings: a GeoParquet written by ``gfm embed``. scene: the scene it came from (default: the one its
            metadata names). cell: panel size in pixels. cols: panels per row (default: ``ceil(sqrt(k + 1))``).

    Raises:
        DataValidationError: no such tile, no metadata, or a scene whose size differs from the file's.
    """
    from matplotlib.figure import Figure

    meta = embedding_metadata(embeddings)
    scene = Path(scene if scene is not None else meta["scene"])
    with rasterio.open(scene) as src:
        if (src.height, src.width) != (meta["height"], meta["width"]):
            raise DataValidationError(f"{scene}: {src.height} x {src.width} px, but {embeddings} was made from a "
                                      f"{meta['height']} x {meta['width']} scene (pass --scene)")
    query = tile_record(embeddings, row, col)
    hits = nearest(embeddings, query["embedding"], k=k + 1)  # the query itself is (normally) the first
    shown = [{**query, "similarity": 1.0}, *[h for h in hits if (h["row"], h["col"]) != (row, col)][:k]]
    images = _stretch(_tiles(scene, shown, list(meta["bands"]), list(meta["value_range"])))
    ncols = cols or math.ceil(math.sqrt(len(shown)))
    nrows = math.ceil(len(shown) / ncols)
    width, height = ncols * cell, nrows * (cell + TITLE_PX)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for i, (hit, img) in enumerate(zip(shown, images, strict=True)):
        r, c = divmod(i, ncols)
        ax = fig.add_axes((c * cell / width, 1 - (r + 1) * (cell + TITLE_PX) / height, cell / width, cell / height))
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        label = "query" if i == 0 else f"#{i} cos {hit['similarity']:.3f}"
        ax.set_title(f"{label} ({hit['row']},{hit['col']})", fontsize=8, pad=2)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return Gallery(Path(out), width, height, hits)
