"""One manifest row: read, hash and summarise one candidate file (this runs in the reader processes).

A file that fails becomes a reason for the quarantine, never an exception: :func:`ingest_file` returns a
:class:`FileOutcome` holding either the row or the reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from gfm_core.data.ingest.dedup import perceptual_hash, phash_hex
from gfm_core.data.raster.reader import read_image
from gfm_core.errors import RasterReadError
from gfm_core.io import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileTask:
    """One candidate file and the rules it is read with (its source's and the ingestion's)."""

    path: str  # absolute path as walked (not resolved)
    rel: str  # relative to the data root, POSIX
    source: str
    source_root: str
    data_root: str
    bands: tuple[int, ...] | None
    value_range: tuple[float, float] | None
    expected_bands: int | None
    default_gsd: float | None
    gsd_range: tuple[float, float] | None
    min_size: int
    max_pixels: int
    max_nodata_fraction: float
    allow_nonfinite: bool


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file: its manifest ``row``, or the ``reason`` it is quarantined."""

    rel: str
    source: str
    row: dict[str, Any] | None = None
    reason: str | None = None


def ingest_file(task: FileTask) -> FileOutcome:
    """Read, hash and summarise one file; every failure becomes a reason (this never raises)."""
    try:
        img = read_image(
            task.path,
            bands=task.bands,
            value_range=task.value_range,
            expected_bands=task.expected_bands,
            max_pixels=task.max_pixels,
            min_size=task.min_size,
            data_root=task.data_root,
            allow_nonfinite=task.allow_nonfinite,
        )
        if img.nodata_fraction > task.max_nodata_fraction:
            return FileOutcome(
                task.rel,
                task.source,
                reason=f"nodata fraction {img.nodata_fraction:.3f} exceeds max_nodata_fraction "
                f"{task.max_nodata_fraction:g}",
            )
        sha = sha256_file(task.path)
        size = os.path.getsize(task.path)
        values = img.array[:, img.valid].astype(np.float64)
        info = img.info
        if info.gsd is not None:
            gsd, gsd_source = info.gsd, "georef"
        elif task.default_gsd is not None:
            gsd, gsd_source = task.default_gsd, "source_default"
        else:
            gsd, gsd_source = None, None
        in_range = None
        if gsd is not None and task.gsd_range is not None:
            in_range = task.gsd_range[0] * 0.99 <= gsd <= task.gsd_range[1] * 1.01
        sub = PurePosixPath(task.rel).parent
        if task.source_root != ".":
            sub = sub.relative_to(task.source_root)
        row = {
            "path": task.rel,
            "source": task.source,
            "class_name": sub.parts[0] if sub.parts else "",
            "subdir": "" if str(sub) == "." else str(sub),
            "sha256": sha,
            "file_size": size,
            "driver": info.driver,
            "width": info.width,
            "height": info.height,
            "bands": info.count,
            "channels": list(img.bands),
            "dtype": info.dtype,
            "value_range": list(img.value_range),
            "crs": info.crs,
            "gsd": gsd,
            "gsd_source": gsd_source,
            "gsd_in_range": in_range,
            "nodata": info.nodata,
            "nodata_fraction": img.nodata_fraction,
            "saturated_fraction": img.saturated_fraction,
            "valid_pixels": int(img.valid.sum()),
            "mean": values.mean(axis=1).tolist(),
            "std": values.std(axis=1).tolist(),
            "phash": phash_hex(perceptual_hash(img)),
        }
        return FileOutcome(task.rel, task.source, row=row)
    except RasterReadError as e:
        return FileOutcome(task.rel, task.source, reason=e.reason)
    except OSError as e:  # the file vanished or became unreadable between the checks and the hash
        return FileOutcome(task.rel, task.source, reason=f"cannot read the file ({e.strerror or e})")
    except Exception as e:  # a reader bug must cost one file, not the run; recorded in the quarantine
        log.exception("%s: unexpected error while ingesting", task.rel)
        return FileOutcome(task.rel, task.source, reason=f"unexpected reader error ({type(e).__name__}: {e})")


def crashed(task: FileTask, why: str) -> FileOutcome:
    """The outcome of a file whose reader process died (``why`` says how)."""
    return FileOutcome(task.rel, task.source, reason=why)
