"""One shard file: its Arrow schema, the stored geometry of an image, and the writer that runs in the workers.

A shard holds images as uint8 ``[H, W, C]`` (channels-last) cells of an uncompressed Arrow IPC file; the format
and why are in :mod:`~gfm_core.data.ingest.shards`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from gfm_core.data.raster.reader import read_image
from gfm_core.data.raster.stretch import Stretch
from gfm_core.errors import DataValidationError, RasterReadError
from gfm_core.io import atomic_write, sha256_file

_BATCH_ROWS = 64  # images per Arrow record batch: bounds a writer's memory, not the reader's speed

SHARD_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("channels", pa.int16(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("pixels", pa.large_binary(), nullable=False),  # uint8 [H, W, C], C-order
    ]
)


def shard_geometry(
    height: int, width: int, shard_size: int, max_aspect: float
) -> tuple[slice, slice, int, int]:
    """The centred region kept of an ``height x width`` image and the size it is stored at.

    Returns:
        ``(rows, cols, out_h, out_w)``: the region (long side cut to ``max_aspect`` times the short side) and
        its stored size (short side ``min(short, shard_size)``, aspect kept).
    """
    short = min(height, width)
    cap = max(short, math.floor(short * max_aspect))
    h, w = min(height, cap), min(width, cap)
    top, left = (height - h) // 2, (width - w) // 2
    scale = min(1.0, shard_size / short)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    return slice(top, top + h), slice(left, left + w), out_h, out_w


def prepare_image(array: np.ndarray, shard_size: int, max_aspect: float) -> np.ndarray:
    """A decoded ``[C, H, W]`` float image in [0, 1] as the uint8 ``[H, W, C]`` a shard stores.

    Antialiased bilinear downscaling of each band in float32 (Pillow's, which torch's ``antialias=True``
    bilinear matches to ~1e-5), then rounding: an image already at its stored size comes back pixel-exact
    (an 8-bit file's original bytes).
    """
    rows, cols, out_h, out_w = shard_geometry(array.shape[1], array.shape[2], shard_size, max_aspect)
    x = np.ascontiguousarray(array[:, rows, cols], dtype=np.float32)
    if x.shape[1:] != (out_h, out_w):
        x = np.stack(
            [
                np.asarray(Image.fromarray(band, mode="F").resize((out_w, out_h), Image.Resampling.BILINEAR))
                for band in x
            ]
        )
    out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


# path, source, sha256, bands, value_range, stretch (lo, hi) or None
ShardRow = tuple[
    str, str, str, tuple[int, ...], tuple[float, float], tuple[tuple[float, ...], tuple[float, ...]] | None
]


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its final file and its manifest rows (sorted by path)."""

    file: str  # final path of the shard
    data_root: str
    rows: tuple[ShardRow, ...]
    shard_size: int
    max_aspect: float


def write_shard(task: ShardTask) -> tuple[str, int, int]:
    """Decode, resize and write one shard; returns ``(file, images, bytes)``. Raises on any bad image."""
    writer = None
    with atomic_write(task.file) as f:
        batch: dict[str, list[Any]] = {n: [] for n in SHARD_SCHEMA.names}

        def flush() -> None:
            nonlocal writer
            if not batch["path"]:
                return
            rb = pa.RecordBatch.from_pydict(batch, schema=SHARD_SCHEMA)
            if writer is None:
                writer = pa.ipc.new_file(f, SHARD_SCHEMA)
            writer.write_batch(rb)
            for v in batch.values():
                v.clear()

        for rel, source, sha, bands, value_range, stretch in task.rows:
            path = os.path.join(task.data_root, rel)
            try:
                if sha256_file(path) != sha:
                    raise DataValidationError(
                        f"{path}: the file changed since the manifest was built (sha256 differs); "
                        f"re-run ingestion before writing shards"
                    )
                img = read_image(  # the file passed ingestion's checks: only re-read it, as it was read there
                    path,
                    bands=bands,
                    value_range=value_range,
                    min_size=1,
                    max_pixels=2**40,
                    allow_nonfinite=True,
                )
            except (OSError, RasterReadError) as e:
                raise DataValidationError(
                    f"{path}: cannot read a manifest image while writing shards ({e}); "
                    f"re-run ingestion so the manifest matches the files"
                ) from e
            array = img.array if stretch is None else Stretch(*stretch).apply(img.array)
            pixels = prepare_image(array, task.shard_size, task.max_aspect)
            batch["path"].append(rel)
            batch["source"].append(source)
            batch["sha256"].append(sha)
            batch["channels"].append(pixels.shape[2])
            batch["height"].append(pixels.shape[0])
            batch["width"].append(pixels.shape[1])
            batch["pixels"].append(pixels.tobytes())
            if len(batch["path"]) >= _BATCH_ROWS:
                flush()
        flush()
        if writer is None:
            raise AssertionError("a shard task without images")  # tasks are never empty
        writer.close()
    return task.file, len(task.rows), os.path.getsize(task.file)
