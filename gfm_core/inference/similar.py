"""Similarity search over an embedding GeoParquet: the tiles nearest a query tile by cosine similarity.

The file is read one row group at a time (only ``embedding``, ``row``, ``col``, ``x``, ``y``, ``h``, ``w`` and
``geometry``),
so a search costs one pass and memory for one row group plus the ``k`` best.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gfm_core.errors import DataValidationError

COLUMNS = ["geometry", "embedding", "row", "col", "x", "y", "h", "w"]


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def tile_record(path: str | Path, row: int, col: int) -> dict[str, Any]:
    """Grid tile ``(row, col)``'s row: :data:`COLUMNS`, with ``embedding`` as float32.

    Raises:
        DataValidationError: the file has no such tile (skipped as nodata, or outside the grid).
    """
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        t = f.read_row_group(i, columns=COLUMNS)
        hit = np.flatnonzero((t["row"].to_numpy() == row) & (t["col"].to_numpy() == col))
        if hit.size:
            rec = {c: t[c][int(hit[0])].as_py() for c in COLUMNS}
            return {**rec, "embedding": np.asarray(rec["embedding"], np.float32)}
    raise DataValidationError(f"{path}: no tile at row {row}, col {col} (all nodata, or outside the grid)")


def tile_vector(path: str | Path, row: int, col: int) -> np.ndarray:
    """The embedding of grid tile ``(row, col)`` (:func:`tile_record`)."""
    return np.asarray(tile_record(path, row, col)["embedding"])


def nearest(path: str | Path, query: np.ndarray, k: int = 8) -> list[dict[str, Any]]:
    """The ``k`` tiles of ``path`` most cosine-similar to ``query`` (best first), each with its ``similarity``.

    Raises:
        DataValidationError: ``query`` does not have the file's embedding size.
    """
    f = pq.ParquetFile(path)
    q = _unit(np.asarray(query, np.float32).ravel())
    best: list[tuple[float, int, dict[str, Any]]] = []
    seen = 0
    for i in range(f.num_row_groups):
        t = f.read_row_group(i, columns=COLUMNS)
        emb = t["embedding"].combine_chunks()
        vectors = emb.flatten().to_numpy().reshape(len(t), -1)
        if vectors.shape[1] != q.size:
            raise DataValidationError(f"{path}: embeddings have {vectors.shape[1]} values, the query {q.size}")
        sims = _unit(vectors) @ q
        for j in np.argsort(-sims)[:k]:
            item = (float(sims[j]), -(seen + int(j)), {c: t[c][int(j)].as_py() for c in COLUMNS if c != "embedding"})
            if len(best) < k:
                heapq.heappush(best, item)
            else:
                heapq.heappushpop(best, item)
        seen += len(t)
    return [{**meta, "similarity": s} for s, _, meta in sorted(best, key=lambda b: (-b[0], -b[1]))]
