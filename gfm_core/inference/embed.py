"""Per-tile embeddings of a whole scene, written as GeoParquet: one row per tile with data.

Tiles come from :func:`~gfm_core.inference.tiles.plan_tiles` with ``overlap = tile - stride`` (default
``stride = tile``: a non-overlapping grid whose last row and column are shifted back inside the scene). Each
tile is read alone, normalised by the band contract and batched through the backbone; the embedding is its
pooled feature vector (:class:`PooledFeatures`). Tiles with no valid pixel are skipped; partly-nodata tiles
are embedded with nodata pixels at 0 (in ``[0, 1]`` units, as the reader does) and their ``valid_fraction``
recorded.

Columns: ``geometry`` (WKB polygon of the tile in the scene's CRS), ``embedding`` (fixed-size list of float32),
``row``, ``col`` (grid position), ``x``, ``y`` (pixel offsets), ``h``, ``w``, ``valid_fraction``. File metadata:
``geo`` (GeoParquet 1.1, :mod:`~gfm_core.inference.geoparquet`) and ``gfm`` (model, weights and teacher sha256,
registry version, scene, tiling, bands, normalisation). Rows are streamed to a temporary file in row groups
(memory flat in the scene size), then copied row group by row group under the final metadata (the bbox is known
only at the end) and moved into place. Optionally (``raster``) the same vectors also go to a low-resolution
GeoTIFF, one pixel per tile (:mod:`~gfm_core.inference.embed_raster`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor, nn

from gfm_core.errors import DataValidationError
from gfm_core.inference.bands import BandContract
from gfm_core.inference.embed_raster import GridWriter
from gfm_core.inference.geoparquet import polygon_wkb, schema_metadata, tile_ring
from gfm_core.inference.runner import TileRunner, probe, progress_bar
from gfm_core.inference.scene import Scene, pad_to
from gfm_core.inference.tiles import Tile, TilePlan, plan_tiles
from gfm_core.io import durable_replace, temp_prefix

ROW_GROUP = 256


class PooledFeatures(nn.Module):
    """A backbone's pooled features ``[B, D]``: timm's ``forward_head(forward_features(x), pre_logits=True)``
    (what ``model(x)`` gives with ``num_classes=0``), else ``model(x)`` averaged over its spatial/token axes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W]`` -> ``[B, D]``."""
        m = cast(Any, self.model)
        if hasattr(m, "forward_features") and hasattr(m, "forward_head"):
            out = m.forward_head(m.forward_features(x), pre_logits=True)
        else:
            out = m(x)
        if out.dim() == 4:
            out = out.mean(dim=(2, 3))
        elif out.dim() == 3:
            out = out.mean(dim=1)
        return cast(Tensor, out)


@dataclass(frozen=True)
class EmbedResult:
    """What :func:`embed_scene` wrote: the file, tiles embedded and skipped, the vector size, seconds, the
    embedding GeoTIFF (or None)."""

    out: Path
    tiles: int
    skipped: int
    dim: int
    seconds: float
    raster: Path | None = None


class _Rows:
    """Buffers rows and streams them as row groups of a Parquet file."""

    def __init__(self, path: Path, dim: int) -> None:
        self.schema = pa.schema([
            ("geometry", pa.binary()), ("embedding", pa.list_(pa.float32(), dim)),
            ("row", pa.int32()), ("col", pa.int32()), ("x", pa.int32()), ("y", pa.int32()),
            ("h", pa.int32()), ("w", pa.int32()), ("valid_fraction", pa.float32()),
        ])
        self.writer = pq.ParquetWriter(path, self.schema)
        self.dim = dim
        self.grid: GridWriter | None = None
        self.rows: list[tuple[bytes, Tile, float]] = []
        self.vectors: list[np.ndarray] = []
        self.bbox = [np.inf, np.inf, -np.inf, -np.inf]
        self.count = 0

    def add(self, ring: list[tuple[float, float]], tile: Tile, valid_fraction: float, vector: np.ndarray) -> None:
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        self.bbox = [min(self.bbox[0], *xs), min(self.bbox[1], *ys), max(self.bbox[2], *xs), max(self.bbox[3], *ys)]
        self.rows.append((polygon_wkb(ring), tile, valid_fraction))
        self.vectors.append(vector.astype(np.float32))
        if self.grid is not None:
            self.grid.add(tile.row, tile.col, vector)
        self.count += 1
        if len(self.rows) >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        flat = pa.array(np.concatenate(self.vectors), pa.float32())
        emb = pa.FixedSizeListArray.from_arrays(flat, self.vectors[0].size)
        cols = [pa.array([g for g, _, _ in self.rows], pa.binary()), emb,
                *(pa.array([getattr(t, k) for _, t, _ in self.rows], pa.int32()) for k in ("row", "col", "x", "y",
                                                                                         "h", "w")),
                pa.array([v for _, _, v in self.rows], pa.float32())]
        self.writer.write_table(pa.Table.from_arrays(cols, schema=self.schema))
        self.rows, self.vectors = [], []


def _finish(tmp: Path, out: Path, metadata: dict[bytes, bytes]) -> None:
    """Copy ``tmp`` row group by row group into ``out`` under ``metadata``, atomically; remove ``tmp``."""
    final = out.parent / f"{temp_prefix(out)}{os.urandom(4).hex()}.parquet"
    try:
        src = pq.ParquetFile(tmp)
        schema = src.schema_arrow.with_metadata(metadata)
        with pq.ParquetWriter(final, schema) as w:
            for i in range(src.num_row_groups):
                w.write_table(src.read_row_group(i).replace_schema_metadata(metadata))
        durable_replace(final, out)
    finally:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)


def embed_scene(
    scene: str | Path,
    model: nn.Module,
    contract: BandContract,
    out: str | Path,
    *,
    tile: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    bands: Sequence[int] | None = None,
    band_names: Sequence[str] | None = None,
    value_range: Sequence[float] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    info: Mapping[str, Any] | None = None,
    raster: str | Path | None = None,
    progress: bool | None = None,
) -> EmbedResult:
    """Embed every tile of ``scene`` with ``model``'s pooled features into the GeoParquet ``out`` (module docstring).

    Args:
        scene: a GeoTIFF/COG of any size. model: a backbone (any module; see :class:`PooledFeatures`).
        contract: its bands and normalisation. tile: window size (default: the contract's input size).
        stride: tile step (default: the tile; at least half of it). info: provenance for the ``gfm`` metadata.
        raster: also write the low-resolution embedding GeoTIFF here (:mod:`~gfm_core.inference.embed_raster`).

    Raises:
        ConfigError, DataValidationError, RasterReadError: bad options, a band mismatch, an unreadable scene,
            or no tile with valid pixels.
    """
    t0 = time.perf_counter()
    tile = tile or contract.input_size[1]
    stride = stride or tile
    runner = TileRunner(PooledFeatures(model), device=device, precision=precision)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{temp_prefix(out)}{os.urandom(4).hex()}.rows.parquet"
    with Scene(scene, contract, bands=bands, band_names=band_names, value_range=value_range) as src:
        plan = plan_tiles(src.height, src.width, tile, tile - stride)
        dim = int(probe(runner, contract.count, tile, contract.input_size[1]).shape[-1])
        try:
            rows = _collect(src, plan, runner, contract, batch_size, _Rows(tmp, dim), raster, progress)
            gfm = {**dict(info or {}), "scene": str(scene), "height": src.height, "width": src.width,
                   "transform": list(src.transform)[:6], "tile": tile, "stride": stride,
                   "bands": list(src.bands), "value_range": list(src.value_range), "contract": asdict(contract),
                   "precision": precision, "tiles": rows.count, "skipped": len(plan) - rows.count,
                   "raster": str(raster) if raster is not None else None}
            _finish(tmp, out, schema_metadata(src.crs, rows.bbox, gfm))
        finally:
            tmp.unlink(missing_ok=True)
    return EmbedResult(out, rows.count, len(plan) - rows.count, dim, round(time.perf_counter() - t0, 3),
                       Path(raster) if raster is not None else None)


def _collect(src: Scene, plan: TilePlan, runner: TileRunner, contract: BandContract, batch_size: int, rows: _Rows,
             raster: str | Path | None, progress: bool | None) -> _Rows:
    """Every tile of ``plan`` embedded into ``rows`` (and the embedding GeoTIFF ``raster``, when given).

    Raises:
        DataValidationError: no tile has a valid pixel (nothing is written).
    """
    with contextlib.ExitStack() as stack:
        stack.callback(rows.writer.close)
        if raster is not None:
            rows.grid = stack.enter_context(GridWriter(
                raster, rows=plan.shape[0], cols=plan.shape[1], dim=rows.dim, crs=src.crs, transform=src.transform,
                stride=plan.tile - plan.overlap))
        with progress_bar(len(plan), f"embed {src.path.name}", progress) as bar:
            _embed_tiles(src, plan, runner, contract, plan.tile, batch_size, rows, bar)
        rows.flush()
        if rows.count == 0:
            raise DataValidationError(f"{src.path}: every one of the {len(plan)} tiles is nodata; nothing to embed")
    return rows


def _embed_tiles(src: Scene, tiles: Iterable[Tile], runner: TileRunner, contract: BandContract, tile: int,
                 batch_size: int, rows: _Rows, bar: Any) -> None:
    """Read, batch and embed ``tiles`` into ``rows``, skipping tiles without valid pixels."""
    pending: list[tuple[Tile, float]] = []
    xs: list[np.ndarray] = []

    def run() -> None:
        vectors = runner(np.stack(xs))
        for (t, frac), v in zip(pending, vectors, strict=True):
            rows.add(tile_ring(src.transform, t.y, t.x, t.h, t.w), t, frac, v)
        pending.clear()
        xs.clear()

    for t in tiles:
        win = src.read(t)
        bar.update(1)
        if not win.valid.any():
            continue
        pending.append((t, float(win.valid.mean())))
        xs.append(pad_to(contract.normalise(win.x01), tile, tile))
        if len(xs) >= batch_size:
            run()
    if xs:
        run()
