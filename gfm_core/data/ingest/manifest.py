"""GeoPile ingestion: walk the sources, read every image in worker processes, write a manifest and quarantine.

:func:`build_manifest` never stops on a bad file and never touches the user's files:

- Each candidate (a file whose name matches its source's patterns) is read with
  :func:`~gfm_core.data.raster.reader.read_image` in a process pool (:mod:`~gfm_core.data.ingest.manifest_row`).
  A file that fails is *recorded* in ``quarantine.json`` with the plain reason; it is not moved, deleted or
  rewritten. With ``IngestSettings.quarantine_copy`` a copy also goes to ``<out_dir>/quarantine/<relative
  path>`` for inspection (only regular files inside the data root are copied, so a symlink that escapes the
  root never exports outside data; :mod:`~gfm_core.data.ingest.quarantine`).
- A reader process that dies (a GDAL segfault on a hostile file, the OOM killer) costs only the files it held:
  they are retried one by one in a single-worker pool, and the file that kills it again is quarantined.
- Paths are checked against the data root after resolving symlinks; file symlinks escaping it are quarantined
  (``read_image`` refuses them), folder symlinks that escape it are quarantined and not followed, folder
  symlinks inside it are followed once (loop-safe; :mod:`~gfm_core.data.ingest.walk`).
- Exact duplicates (same sha256) are quarantined as ``exact duplicate of <path>``, keeping the first path in
  sorted order. Perceptual near-duplicates are kept and flagged in the ``near_duplicate_of`` column.

``manifest.parquet`` (one row per accepted image, sorted by path) and ``quarantine.json`` are written
atomically; the manifest is written last, so a new manifest always has its matching quarantine file beside it.
The manifest's *content hash* (sha256 over the sorted ``path<TAB>sha256`` lines) is the pile's lineage id: it
goes into the parquet metadata, ``quarantine.json``, the :class:`IngestReport` and the normalisation stats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gfm_core.data.ingest.dedup import flag_near_duplicates
from gfm_core.data.ingest.manifest_row import FileOutcome, FileTask, crashed, ingest_file
from gfm_core.data.ingest.quarantine import (
    QUARANTINE_DIR,
    QUARANTINE_NAME,
    QuarantineEntry,
    check_own_quarantine,
    copy_quarantined,
    remove_own_quarantine,
)
from gfm_core.data.ingest.sources import IngestSettings, SourceSpec
from gfm_core.data.ingest.walk import resolve_sources, walk_source
from gfm_core.data.ingest.workers import map_isolated
from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.io import atomic_write, clean_stale_temps, sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
MANIFEST_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # relative to the data root, POSIX
        pa.field("source", pa.string(), nullable=False),
        pa.field(
            "class_name", pa.string(), nullable=False
        ),  # first folder under the source root ("" if none)
        pa.field("subdir", pa.string(), nullable=False),  # parent folder relative to the source root
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("file_size", pa.int64(), nullable=False),
        pa.field("driver", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("bands", pa.int16(), nullable=False),  # bands in the file
        pa.field("channels", pa.list_(pa.int16()), nullable=False),  # 1-based bands read, in order
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("value_range", pa.list_(pa.float64()), nullable=False),  # (lo, hi) mapped to [0, 1]
        pa.field("crs", pa.string()),
        pa.field("gsd", pa.float64()),  # metres
        pa.field("gsd_source", pa.string()),  # "georef" | "source_default" | null
        pa.field("gsd_in_range", pa.bool_()),  # against the source's gsd_range; null if unknown
        pa.field("nodata", pa.float64()),
        pa.field("nodata_fraction", pa.float64(), nullable=False),
        pa.field("saturated_fraction", pa.float64(), nullable=False),
        pa.field("valid_pixels", pa.int64(), nullable=False),
        pa.field(
            "mean", pa.list_(pa.float64()), nullable=False
        ),  # per channel, of [0, 1] values, valid pixels
        pa.field("std", pa.list_(pa.float64()), nullable=False),  # population std (ddof=0), same pixels
        pa.field("phash", pa.string(), nullable=False),  # 64-bit perceptual hash, 16 hex digits
        pa.field("near_duplicate_of", pa.string()),
        pa.field("near_duplicate_distance", pa.int16()),
    ]
)

@dataclass(frozen=True)
class IngestReport:
    r"""What :func:`build_manifest` did.

    Attributes:
        manifest_path: the written ``manifest.parquet``.
        quarantine_path: the written ``quarantine.json``.
        content_hash: sha256 of the manifest's sorted ``path\tsha256`` lines (the pile's lineage id).
        candidates: files that matched a source's patterns.
        accepted: rows in the manifest.
        quarantined: entries in the quarantine (files and folders).
        exact_duplicates: quarantined as exact duplicates (included in ``quarantined``).
        near_duplicates: accepted rows flagged ``near_duplicate_of``.
        ignored: files that matched no pattern (labels, sidecars); hidden files are not counted.
        per_source: ``{source: {"accepted": n, "quarantined": m}}``.
        entries: the quarantine entries, sorted by path.
    """

    manifest_path: Path
    quarantine_path: Path
    content_hash: str
    candidates: int
    accepted: int
    quarantined: int
    exact_duplicates: int
    near_duplicates: int
    ignored: int
    per_source: Mapping[str, Mapping[str, int]]
    entries: tuple[QuarantineEntry, ...] = field(repr=False)

    @property
    def bad_fraction(self) -> float:
        """Quarantined share of everything seen (accepted + quarantined); 0.0 for an empty pile."""
        total = self.accepted + self.quarantined
        return self.quarantined / total if total else 0.0


# --------------------------------------------------------------------------------------------------- manifest


def manifest_content_hash(rows: Iterable[tuple[str, str]]) -> str:
    """sha256 of the sorted ``path<TAB>sha256<LF>`` lines: the lineage id of a pile."""
    h = hashlib.sha256()
    for path, sha in sorted(rows):
        h.update(f"{path}\t{sha}\n".encode())
    return h.hexdigest()


def read_manifest(manifest: str | Path | pa.Table) -> pa.Table:
    """Load a manifest (or pass a table through), checking its columns.

    Raises:
        DataValidationError: the file is missing, not parquet, or lacks manifest columns.
    """
    if isinstance(manifest, pa.Table):
        table = manifest
    else:
        try:
            table = pq.read_table(manifest)
        except (OSError, pa.ArrowException) as e:
            raise DataValidationError(f"{manifest}: cannot read the manifest ({e})") from e
    missing = [
        n
        for n in ("path", "source", "sha256", "phash", "mean", "std", "valid_pixels")
        if n not in table.column_names
    ]
    if missing:
        raise DataValidationError(
            f"{manifest if not isinstance(manifest, pa.Table) else 'manifest'}: missing column(s) {missing}"
        )
    return table


def load_manifest(path: str | Path) -> tuple[pa.Table, str]:
    """The manifest table and the sha256 of the very bytes it was parsed from (what a verdict binds to).

    Raises:
        DataValidationError: the file is missing, not parquet, or lacks manifest columns.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataValidationError(f"{path}: cannot read the manifest ({e}); run `gfm ingest`") from e
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as e:
        raise DataValidationError(f"{path}: cannot read the manifest ({e})") from e
    return read_manifest(table), hashlib.sha256(data).hexdigest()


def build_manifest(
    data_root: str | Path,
    sources: Sequence[SourceSpec],
    out_dir: str | Path,
    *,
    settings: IngestSettings | None = None,
    workers: int | None = None,
    min_size: int | None = None,
    progress: bool = True,
) -> IngestReport:
    """Ingest every image of ``sources`` under ``data_root`` into ``<out_dir>/manifest.parquet``.

    Args:
        data_root: the folder every source root is relative to; nothing outside it is read.
        sources: the sources (:func:`~gfm_core.data.ingest.sources.discover_geopile`, presets, folder sources).
        out_dir: where ``manifest.parquet``, ``quarantine.json`` (and ``quarantine/`` copies) go; it must not
            lie inside a source.
        settings: ingestion policy; defaults to :class:`~gfm_core.data.ingest.sources.IngestSettings()`.
        workers: reader processes, overriding ``settings.workers`` (None there = ``os.cpu_count()``; 0 = this
            process).
        min_size: minimum width/height in pixels, overriding ``settings.min_size``.
        progress: show a tqdm bar on stderr.

    Returns:
        The :class:`IngestReport`.

    Raises:
        ConfigError: the data root or a source folder is missing, a source escapes the data root, sources
            overlap, or ``out_dir`` is inside a source. Bad *files* never raise: they are quarantined.
    """
    from tqdm.auto import tqdm

    settings = settings or IngestSettings()
    overrides = {k: v for k, v in (("workers", workers), ("min_size", min_size)) if v is not None}
    if overrides:
        settings = settings.model_validate({**settings.model_dump(), **overrides})
    n_workers = settings.workers if settings.workers is not None else (os.cpu_count() or 1)
    out_dir = Path(out_dir)
    root, resolved = _check_roots(data_root, sources, out_dir)

    tasks, quarantined, ignored = _candidates(root, resolved, settings)
    log.info("ingesting %d candidate file(s) from %d source(s) with %d worker(s)", len(tasks), len(resolved),
             n_workers)
    with tqdm(total=len(tasks), desc="geopile", unit="img", disable=not progress) as bar:
        outcomes = map_isolated(ingest_file, tasks, workers=n_workers, chunk_size=settings.chunk_size,
                                on_crash=crashed, on_done=bar.update, preload=[ingest_file.__module__])
    rows, exact = _accept(outcomes, quarantined)
    near = flag_near_duplicates(rows, settings.near_dup_max_hamming)

    quarantined.sort(key=lambda e: (e.path, e.reason))
    content_hash = manifest_content_hash((r["path"], r["sha256"]) for r in rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.quarantine_copy:
        quarantined = copy_quarantined(root, out_dir, quarantined)
    else:
        remove_own_quarantine(out_dir / QUARANTINE_DIR)
    quarantine_path, manifest_path = _write(root, out_dir, resolved, settings, rows, quarantined, content_hash)

    report = IngestReport(
        manifest_path=manifest_path,
        quarantine_path=quarantine_path,
        content_hash=content_hash,
        candidates=len(tasks),
        accepted=len(rows),
        quarantined=len(quarantined),
        exact_duplicates=exact,
        near_duplicates=near,
        ignored=ignored,
        per_source=_per_source(resolved, rows, quarantined),
        entries=tuple(quarantined),
    )
    log.info(
        "geopile: %d accepted, %d quarantined (%d exact duplicates), %d near-duplicates flagged; content %s",
        report.accepted,
        report.quarantined,
        exact,
        near,
        content_hash[:12],
    )
    return report


def _check_roots(
    data_root: str | Path, sources: Sequence[SourceSpec], out_dir: Path
) -> tuple[Path, list[tuple[SourceSpec, Path]]]:
    """The real data root and the resolved sources; stale temps of a killed ingest are removed first."""
    if not Path(data_root).is_dir():
        raise ConfigError(
            f"{data_root}: data root not found (set the ingest root to the folder holding the pile)"
        )
    root = Path(os.path.realpath(data_root))
    resolved = resolve_sources(root, sources, out_dir)
    clean_stale_temps(out_dir)  # temps of a killed earlier ingest
    check_own_quarantine(out_dir / QUARANTINE_DIR)  # fail now, not after reading the whole pile
    return root, resolved


def _candidates(
    root: Path, resolved: Sequence[tuple[SourceSpec, Path]], settings: IngestSettings
) -> tuple[list[FileTask], list[QuarantineEntry], int]:
    """Every source's candidate files as reader tasks (sorted by path), folder quarantine, ignored count."""
    tasks: list[FileTask] = []
    quarantined: list[QuarantineEntry] = []
    ignored = 0
    for spec, _ in resolved:
        files, bad, n_ignored = walk_source(root, spec, settings.skip_hidden)
        quarantined.extend(bad)
        ignored += n_ignored
        tasks.extend(
            FileTask(
                path=path,
                rel=rel,
                source=spec.name,
                source_root=str(spec.root),
                data_root=str(root),
                bands=spec.bands,
                value_range=spec.value_range,
                expected_bands=spec.expected_bands,
                default_gsd=spec.default_gsd,
                gsd_range=spec.gsd_range,
                min_size=settings.min_size,
                max_pixels=settings.max_pixels,
                max_nodata_fraction=settings.max_nodata_fraction,
                allow_nonfinite=settings.allow_nonfinite,
            )
            for path, rel in files
        )
    tasks.sort(key=lambda t: t.rel)
    return tasks, quarantined, ignored


def _accept(outcomes: Iterable[FileOutcome], quarantined: list[QuarantineEntry]) -> tuple[list[dict[str, Any]], int]:
    """The manifest rows; failed files and exact duplicates are appended to ``quarantined``."""
    rows: list[dict[str, Any]] = []
    first_by_sha: dict[str, str] = {}
    exact = 0
    for o in outcomes:  # sorted by path: the first copy of a file is the one kept
        if o.row is None:
            quarantined.append(QuarantineEntry(o.rel, o.source, o.reason or "unknown reason"))
        elif o.row["sha256"] in first_by_sha:
            exact += 1
            quarantined.append(
                QuarantineEntry(o.rel, o.source, f"exact duplicate of {first_by_sha[o.row['sha256']]}")
            )
        else:
            first_by_sha[o.row["sha256"]] = o.rel
            rows.append(o.row)
    return rows, exact


def _per_source(
    resolved: Sequence[tuple[SourceSpec, Path]], rows: list[dict[str, Any]], quarantined: list[QuarantineEntry]
) -> dict[str, dict[str, int]]:
    per_source = {spec.name: {"accepted": 0, "quarantined": 0} for spec, _ in resolved}
    for r in rows:
        per_source[r["source"]]["accepted"] += 1
    for e in quarantined:
        per_source[e.source]["quarantined"] += 1
    return per_source


def _write(
    root: Path,
    out_dir: Path,
    resolved: Sequence[tuple[SourceSpec, Path]],
    settings: IngestSettings,
    rows: list[dict[str, Any]],
    quarantined: list[QuarantineEntry],
    content_hash: str,
) -> tuple[Path, Path]:
    """Write ``quarantine.json``, then ``manifest.parquet`` (last: a new manifest has its quarantine beside it)."""
    quarantine_path = write_json(
        out_dir / QUARANTINE_NAME,
        {
            "schema": "gfm.geopile.quarantine",
            "version": MANIFEST_VERSION,
            "data_root": str(root),
            "manifest_content_hash": content_hash,
            "count": len(quarantined),
            "policy": "files are recorded, never moved or deleted"
            + ("; regular files copied to quarantine/" if settings.quarantine_copy else ""),
            "entries": [asdict(e) for e in quarantined],
        },
    )
    meta = {
        "schema_version": str(MANIFEST_VERSION),
        "content_hash": content_hash,
        "data_root": str(root),
        "sources": json.dumps([s.model_dump(mode="json") for s, _ in resolved], sort_keys=True),
        "settings": settings.model_dump_json(exclude={"workers", "chunk_size"}),  # not content: same bytes
        "quarantine_sha256": sha256_file(quarantine_path),
    }
    manifest_path = out_dir / MANIFEST_NAME
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({f"gfm.{k}": v for k, v in meta.items()})
    with atomic_write(manifest_path) as f:
        pq.write_table(table, f, compression="zstd")
    return quarantine_path, manifest_path
