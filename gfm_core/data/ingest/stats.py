"""Per-source, per-band normalisation statistics of a GeoPile manifest, as a versioned JSON artifact.

Each manifest row holds its image's per-channel mean and population std over valid pixels (values already
scaled to ``[0, 1]``) and its valid-pixel count ``n``. Pooling them is exact:

``mean = sum(n_i m_i) / N``,   ``var = sum(n_i (s_i^2 + m_i^2)) / N - mean^2``

so the statistics equal those of all valid pixels of a source taken together, without re-reading any image.

A per-source, per-band contrast stretch (:class:`~gfm_core.data.raster.stretch.Stretch`) maps the ``p_lo`` and
``p_hi`` percentiles of a source's valid pixels to 0 and 1 (e.g. 2-98 %: uint16 Landsat DNs fill a tenth of the
dtype's range, and 8-bit training shards would keep about 25 grey levels of it). The percentiles come from a
deterministic sample: up to ``STRETCH_MAX_IMAGES`` images of the source, evenly spaced in path order, and up to
``STRETCH_MAX_PIXELS`` evenly spaced valid pixels of each (exact for small sources; an estimate for
GeoPile-sized ones). The same stretch is applied when the shards are written and when a downstream task reads
the same source.

The artifact records the manifest's content hash, so a model's normalisation can be traced to the pile it came
from, and contains nothing run-specific (no timestamps): the same manifest always gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from gfm_core.data.ingest.manifest import manifest_content_hash, read_manifest
from gfm_core.data.raster.stretch import Stretch
from gfm_core.errors import DataValidationError
from gfm_core.io import write_json

STATS_SCHEMA = "gfm.geopile.norm_stats"
STATS_VERSION = 2
STRETCH_MAX_IMAGES = 64
STRETCH_MAX_PIXELS = 65_536


@dataclass(frozen=True)
class BandStats:
    """Pooled statistics of a set of images (one entry per channel)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixels: int
    images: int
    stretch: Stretch | None = None


@dataclass(frozen=True)
class NormStats:
    """Normalisation statistics of a pile.

    Attributes:
        manifest_hash: content hash of the manifest they were computed from.
        sources: per-source statistics.
        pooled: all sources together, or None when sources differ in channel count.
        version: artifact schema version.
    """

    manifest_hash: str
    sources: dict[str, BandStats]
    pooled: BandStats | None
    version: int = STATS_VERSION


def _pool(means: np.ndarray, stds: np.ndarray, counts: np.ndarray) -> BandStats:
    n = counts.astype(np.float64)
    total = n.sum()
    mean = (n[:, None] * means).sum(axis=0) / total
    second = (n[:, None] * (stds**2 + means**2)).sum(axis=0) / total
    std = np.sqrt(np.clip(second - mean**2, 0.0, None))
    return BandStats(
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        pixels=int(counts.sum()),
        images=int(counts.size),
    )


def compute_norm_stats(
    manifest: str | Path | pa.Table,
    *,
    stretch_percentiles: tuple[float, float] | None = None,
    data_root: str | Path | None = None,
) -> NormStats:
    """Pool the manifest's per-image statistics per source (weighted by valid pixels).

    With ``stretch_percentiles`` each source also gets its :class:`Stretch`, read from a sample of its images
    under ``data_root`` (None = the root recorded in the manifest).

    Raises:
        DataValidationError: the manifest is empty, unreadable, or a source mixes channel counts (its images
            could not share one normalisation).
    """
    table = read_manifest(manifest)
    if table.num_rows == 0:
        raise DataValidationError("manifest has no images: nothing to compute normalisation statistics from")
    sources = table.column("source").to_pylist()
    means = table.column("mean").to_pylist()
    stds = table.column("std").to_pylist()
    counts = np.asarray(table.column("valid_pixels").to_pylist(), dtype=np.int64)
    content = manifest_content_hash(
        zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True)
    )

    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    out: dict[str, BandStats] = {}
    widths: set[int] = set()
    for name in sorted(by_source):
        idx = by_source[name]
        lengths = sorted({len(means[i]) for i in idx})
        if len(lengths) > 1:
            raise DataValidationError(
                f"source {name!r} mixes images with {lengths} channels; set the source's bands so every "
                f"image yields the same channels"
            )
        widths.add(lengths[0])
        out[name] = _pool(
            np.asarray([means[i] for i in idx]), np.asarray([stds[i] for i in idx]), counts[idx]
        )
        if stretch_percentiles is not None:
            root = data_root or (table.schema.metadata or {}).get(b"gfm.data_root", b"").decode()
            if not root:
                raise DataValidationError("the manifest records no data root: pass data_root for the stretch")
            out[name] = replace(out[name], stretch=_source_stretch(table, idx, Path(root), stretch_percentiles))
    pooled = None
    if len(widths) == 1:
        pooled = _pool(np.asarray(means), np.asarray(stds), counts)
    return NormStats(manifest_hash=content, sources=out, pooled=pooled)


def _source_stretch(table: pa.Table, idx: list[int], root: Path, percentiles: tuple[float, float]) -> Stretch:
    """The percentiles of a deterministic sample of the source's valid pixels (module docstring)."""
    from gfm_core.data.raster.reader import read_image

    paths = table.column("path").to_pylist()
    order = sorted(idx, key=lambda i: paths[i])
    picked = [order[round(k)] for k in np.linspace(0, len(order) - 1, min(len(order), STRETCH_MAX_IMAGES))]
    channels = table.column("channels").to_pylist()
    ranges = table.column("value_range").to_pylist()
    samples = []
    for i in picked:
        img = read_image(root / paths[i], bands=channels[i], value_range=tuple(ranges[i]), min_size=1,
                         allow_nonfinite=True)
        px = img.array[:, img.valid]
        samples.append(px[:, :: max(1, px.shape[1] // STRETCH_MAX_PIXELS)])
    lo, hi = np.percentile(np.concatenate(samples, axis=1), percentiles, axis=1)
    return Stretch(tuple(float(v) for v in lo), tuple(float(v) for v in hi),
                   (float(percentiles[0]), float(percentiles[1])), len(picked))


def write_norm_stats(stats: NormStats, path: str | Path) -> Path:
    """Write the statistics atomically as JSON (sorted keys; identical stats give identical bytes)."""
    return write_json(
        path,
        {
            "schema": STATS_SCHEMA,
            "version": stats.version,
            "manifest_hash": stats.manifest_hash,
            "value_scale": "per-source read_image scaling to [0, 1]; statistics over valid pixels (before any "
            "stretch)",
            "sources": {k: asdict(v) for k, v in stats.sources.items()},
            "pooled": asdict(stats.pooled) if stats.pooled is not None else None,
        },
    )


def load_norm_stats(path: str | Path) -> NormStats:
    """Read statistics written by :func:`write_norm_stats`.

    Raises:
        DataValidationError: missing file, wrong schema or version, or malformed content.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataValidationError(f"{path}: cannot read normalisation statistics ({e})") from e
    if not isinstance(raw, dict) or raw.get("schema") != STATS_SCHEMA:
        raise DataValidationError(f"{path}: not a {STATS_SCHEMA} file")
    if raw.get("version") != STATS_VERSION:
        raise DataValidationError(
            f"{path}: statistics version {raw.get('version')!r}, this code reads version {STATS_VERSION} "
            f"(recompute them with compute_norm_stats)"
        )

    def band(d: dict) -> BandStats:
        st = d.get("stretch")
        stretch = None if st is None else Stretch(
            tuple(st["lo"]), tuple(st["hi"]), tuple(st["percentiles"]), int(st["images"])  # type: ignore[arg-type]
        )
        return BandStats(tuple(d["mean"]), tuple(d["std"]), int(d["pixels"]), int(d["images"]), stretch)

    try:
        return NormStats(
            manifest_hash=str(raw["manifest_hash"]),
            sources={k: band(v) for k, v in raw["sources"].items()},
            pooled=band(raw["pooled"]) if raw.get("pooled") is not None else None,
            version=int(raw["version"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataValidationError(
            f"{path}: malformed normalisation statistics ({type(e).__name__}: {e})"
        ) from e


def load_stretches(path: str | Path) -> dict[str, Stretch]:
    """Source name -> :class:`Stretch` of the sources that have one (none: ``ingest.stretch`` is off)."""
    return {k: v.stretch for k, v in load_norm_stats(path).sources.items() if v.stretch is not None}
