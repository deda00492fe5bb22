"""GeoPile ingestion: walk the sources, read every image in worker processes, write a manifest and quarantine.

:func:`build_manifest` never stops on a bad file and never touches the user's files:

- Each candidate (a file whose name matches its source's patterns) is read with :func:`~gfm_core.data.raster.reader.
  read_image` in a process pool. A file that fails is *recorded* in ``quarantine.json`` with the plain reason;
  it is not moved, deleted or rewritten. With ``IngestSettings.quarantine_copy`` a copy also goes to
  ``<out_dir>/quarantine/<relative path>`` for inspection (only regular files inside the data root are copied,
  so a symlink that escapes the root never exports outside data).
- A reader process that dies (a GDAL segfault on a hostile file, the OOM killer) costs only the files it held:
  they are retried one by one in a single-worker pool, and the file that kills it again is quarantined.
- Paths are checked against the data root after resolving symlinks; file symlinks escaping it are quarantined
  (``read_image`` refuses them), folder symlinks that escape it are quarantined and not followed, folder
  symlinks inside it are followed once (loop-safe).
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
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gfm_core.data.ingest.dedup import hamming_join, near_duplicates, perceptual_hash, phash_hex
from gfm_core.data.ingest.sources import IngestSettings, SourceSpec
from gfm_core.data.ingest.workers import map_isolated
from gfm_core.data.raster.reader import DEFAULT_MAX_PIXELS, RasterImage, read_image
from gfm_core.errors import ConfigError, DataValidationError, RasterReadError
from gfm_core.io import atomic_write, clean_stale_temps, durable_replace, make_temp_dir, sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
QUARANTINE_NAME = "quarantine.json"
QUARANTINE_DIR = "quarantine"
MANIFEST_VERSION = 1
_QUARANTINE_MARKER = ".gfm-quarantine"

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


# --------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class QuarantineEntry:
    """A file (or folder) left out of the pile, and why. ``copy`` is its copy under ``out_dir``, if made."""

    path: str
    source: str
    reason: str
    copy: str | None = None


@dataclass(frozen=True)
class IngestReport:
    """What :func:`build_manifest` did.

    Attributes:
        manifest_path: the written ``manifest.parquet``.
        quarantine_path: the written ``quarantine.json``.
        content_hash: sha256 of the manifest's sorted ``path\\tsha256`` lines (the pile's lineage id).
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


@dataclass(frozen=True)
class Offender:
    """A downstream test image found in the pile.

    Attributes:
        test_path: the test image.
        pile_path: the manifest row it matches.
        kind: ``exact`` (same sha256) or ``near`` (perceptual hash within ``distance`` bits).
        distance: Hamming distance of the perceptual hashes (0 for exact copies).
    """

    test_path: str
    pile_path: str
    kind: Literal["exact", "near"]
    distance: int


# --------------------------------------------------------------------------------------------------- walking


@dataclass(frozen=True)
class _Task:
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
class _Outcome:
    rel: str
    source: str
    row: dict[str, Any] | None = None
    reason: str | None = None


def _inside(path: str | Path, root: str | Path) -> bool:
    return Path(path).is_relative_to(root)


def _resolve_sources(
    data_root: Path, sources: Sequence[SourceSpec], out_dir: Path
) -> list[tuple[SourceSpec, Path]]:
    if not sources:
        raise ConfigError("no GeoPile sources given (use discover_geopile(data_root) or get_preset(name))")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"source names must be unique; repeated: {dupes}")
    out_real = Path(os.path.realpath(out_dir))
    resolved: list[tuple[SourceSpec, Path]] = []
    for spec in sources:
        root = data_root / spec.root
        real = Path(os.path.realpath(root))
        if not _inside(real, data_root):
            raise ConfigError(
                f"source {spec.name!r}: root {spec.root} resolves outside the data root ({real})"
            )
        if not real.is_dir():
            raise ConfigError(f"source {spec.name!r}: folder {root} not found (check the source's root)")
        if _inside(out_real, real):
            raise ConfigError(
                f"out_dir {out_dir} lies inside source {spec.name!r} ({root}); its outputs would be ingested "
                f"next time: choose an out_dir outside the sources"
            )
        resolved.append((spec, real))
    for a, ra in resolved:
        for b, rb in resolved:
            if a.name < b.name and (_inside(ra, rb) or _inside(rb, ra)):
                raise ConfigError(
                    f"sources {a.name!r} and {b.name!r} overlap ({ra} and {rb}); each file is seen twice"
                )
    return resolved


def _walk(
    data_root: Path, spec: SourceSpec, skip_hidden: bool
) -> tuple[list[tuple[str, str]], list[QuarantineEntry], int]:
    """One source's candidate files ``(absolute path, relative path)``, folder quarantine, ignored count."""
    patterns = tuple(p.lower() for p in spec.patterns)
    start = data_root / spec.root
    files: list[tuple[str, str]] = []
    bad: list[QuarantineEntry] = []
    ignored = 0
    visited = {os.path.realpath(start)}
    stack: list[tuple[str, PurePosixPath]] = [(str(start), PurePosixPath(spec.root))]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            bad.append(
                QuarantineEntry(
                    str(rel), spec.name, f"cannot list the folder ({e.strerror}); nothing in it was ingested"
                )
            )
            continue
        subdirs: list[tuple[str, PurePosixPath]] = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            erel = rel / entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(entry.path)
                if entry.is_symlink() and not _inside(real, data_root):
                    bad.append(
                        QuarantineEntry(
                            str(erel),
                            spec.name,
                            f"folder symlink resolves outside the data root (-> {real}); not followed",
                        )
                    )
                elif real not in visited:
                    visited.add(real)
                    subdirs.append((entry.path, erel))
                else:
                    log.info("%s: folder already walked through another path (%s); skipped", erel, real)
            elif any(fnmatch(entry.name.lower(), p) for p in patterns):
                files.append((entry.path, str(erel)))
            else:
                ignored += 1
        stack.extend(reversed(subdirs))
    return files, bad, ignored


# --------------------------------------------------------------------------------------------------- workers


def _ingest_file(task: _Task) -> _Outcome:
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
            return _Outcome(
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
        return _Outcome(task.rel, task.source, row=row)
    except RasterReadError as e:
        return _Outcome(task.rel, task.source, reason=e.reason)
    except OSError as e:  # the file vanished or became unreadable between the checks and the hash
        return _Outcome(task.rel, task.source, reason=f"cannot read the file ({e.strerror or e})")
    except Exception as e:  # a reader bug must cost one file, not the run; recorded in the quarantine
        log.exception("%s: unexpected error while ingesting", task.rel)
        return _Outcome(task.rel, task.source, reason=f"unexpected reader error ({type(e).__name__}: {e})")


def _crashed(task: _Task, why: str) -> _Outcome:
    return _Outcome(task.rel, task.source, reason=why)


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


def _table(rows: list[dict[str, Any]], meta: Mapping[str, str]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return table.replace_schema_metadata({f"gfm.{k}": v for k, v in meta.items()})


def _copy_quarantined(
    data_root: Path, out_dir: Path, entries: list[QuarantineEntry]
) -> list[QuarantineEntry]:
    """Copy quarantined regular files under the data root to ``<out_dir>/quarantine/`` (fresh each run)."""
    final = out_dir / QUARANTINE_DIR
    tmp = make_temp_dir(final)
    try:
        out = _copy_into(data_root, tmp, entries)
        _remove_own_quarantine(final)
        durable_replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_into(data_root: Path, tmp: Path, entries: list[QuarantineEntry]) -> list[QuarantineEntry]:
    (tmp / _QUARANTINE_MARKER).write_text(
        "copies made by gfm_core.data.ingest.manifest.build_manifest; safe to delete\n"
    )
    out = []
    for e in entries:
        src = data_root / e.path
        real = os.path.realpath(src)
        copy = None
        if os.path.isfile(src) and _inside(real, data_root):
            dst = tmp / e.path
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                copy = str(PurePosixPath(QUARANTINE_DIR) / e.path)
            except OSError as err:
                log.warning("%s: could not copy into the quarantine folder (%s)", e.path, err)
        out.append(QuarantineEntry(e.path, e.source, e.reason, copy))
    return out


def _check_own_quarantine(folder: Path) -> None:
    if folder.exists() and not (folder / _QUARANTINE_MARKER).is_file():
        raise ConfigError(
            f"{folder} exists but was not made by build_manifest; move it away or pick another out_dir"
        )


def _remove_own_quarantine(folder: Path) -> None:
    _check_own_quarantine(folder)
    if folder.exists():
        shutil.rmtree(folder)


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
    if not Path(data_root).is_dir():
        raise ConfigError(
            f"{data_root}: data root not found (set the ingest root to the folder holding the pile)"
        )
    root = Path(os.path.realpath(data_root))
    out_dir = Path(out_dir)
    resolved = _resolve_sources(root, sources, out_dir)
    clean_stale_temps(out_dir)  # temps of a killed earlier ingest
    _check_own_quarantine(out_dir / QUARANTINE_DIR)  # fail now, not after reading the whole pile

    tasks: list[_Task] = []
    quarantined: list[QuarantineEntry] = []
    ignored = 0
    for spec, _ in resolved:
        files, bad, n_ignored = _walk(root, spec, settings.skip_hidden)
        quarantined.extend(bad)
        ignored += n_ignored
        tasks.extend(
            _Task(
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
    log.info(
        "ingesting %d candidate file(s) from %d source(s) with %d worker(s)",
        len(tasks),
        len(resolved),
        n_workers,
    )

    with tqdm(total=len(tasks), desc="geopile", unit="img", disable=not progress) as bar:
        outcomes = map_isolated(
            _ingest_file,
            tasks,
            workers=n_workers,
            chunk_size=settings.chunk_size,
            on_crash=_crashed,
            on_done=bar.update,
            preload=[__name__],
        )

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

    near = 0
    if settings.near_dup_max_hamming is not None:
        hashes = [int(r["phash"], 16) for r in rows]
        of, dist = near_duplicates(hashes, settings.near_dup_max_hamming)
        for r, j, d in zip(rows, of, dist, strict=True):
            r["near_duplicate_of"] = rows[j]["path"] if j is not None else None
            r["near_duplicate_distance"] = d
            near += j is not None

    quarantined.sort(key=lambda e: (e.path, e.reason))
    content_hash = manifest_content_hash((r["path"], r["sha256"]) for r in rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.quarantine_copy:
        quarantined = _copy_quarantined(root, out_dir, quarantined)
    else:
        _remove_own_quarantine(out_dir / QUARANTINE_DIR)

    per_source = {spec.name: {"accepted": 0, "quarantined": 0} for spec, _ in resolved}
    for r in rows:
        per_source[r["source"]]["accepted"] += 1
    for e in quarantined:
        per_source[e.source]["quarantined"] += 1
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
    table = _table(rows, meta)
    with atomic_write(manifest_path) as f:
        pq.write_table(table, f, compression="zstd")

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
        per_source=per_source,
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


# --------------------------------------------------------------------------------------------------- leakage


DownstreamImage = str | Path | tuple[str | Path, ...]
"""A downstream image: one file, or one file per band (BigEarthNet, OSCD), composed in the given order."""


def _read_test_image(item: DownstreamImage, bands: Sequence[int] | None, value_range: tuple[float, float] | None,
                     max_pixels: int) -> RasterImage:
    """One test image; per-band files are read one band each and resized to the first file's grid."""
    kw = dict(value_range=value_range, min_size=2, max_pixels=max_pixels, allow_nonfinite=True)
    if not isinstance(item, tuple):
        return read_image(item, bands=bands, **kw)
    parts = [read_image(f, bands=(1,), **kw) for f in item[:3]]  # the hash averages the first three bands
    h, w = parts[0].array.shape[1:]
    planes, valid = [], parts[0].valid
    for part in parts:
        plane = part.array[0]
        if plane.shape != (h, w):
            plane = np.asarray(Image.fromarray(plane, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        planes.append(plane)
    return replace(parts[0], array=np.stack(planes).astype(np.float32), valid=valid,
                   bands=tuple(range(1, len(planes) + 1)))


def image_label(item: DownstreamImage) -> str:
    """How a test image is named in reports (per-band files: the files joined by ``+``)."""
    return "+".join(str(f) for f in item) if isinstance(item, tuple) else str(item)


def contamination_check(
    manifest: str | Path | pa.Table,
    test_images: Iterable[DownstreamImage],
    *,
    max_hamming: int = 8,
    bands: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Offender]:
    """Downstream test images that sit in the pile, as exact copies or perceptual near-duplicates.

    Args:
        manifest: a manifest path or table from :func:`build_manifest`.
        test_images: the downstream test images (any format :func:`read_image` reads); a tuple is one image
            stored as one file per band (hashed as their composite; each file's sha256 is compared too).
        max_hamming: perceptual-hash distance (of 64 bits) at or under which an image counts as the same
            picture (re-encoded, rescaled, slightly recoloured). Unrelated images are rarely under ~10.
        bands: bands of the test images to hash (the hash averages the first three: RGB and BGR agree).
        value_range: scaling of the test images (the hash is insensitive to brightness scaling).
        max_pixels: largest test image accepted, in samples.

    Returns:
        Offenders sorted by test path, then distance, then pile path; empty when the pile is clean.

    Raises:
        RasterReadError: a test image cannot be read (a check that skipped it could pass wrongly).
        DataValidationError: the manifest cannot be read.
    """
    table = read_manifest(manifest)
    pile_paths = table.column("path").to_pylist()
    pile_sha = table.column("sha256").to_pylist()
    pile_hash = np.array([int(h, 16) for h in table.column("phash").to_pylist()], dtype=np.uint64)
    by_sha: dict[str, list[str]] = {}
    for p, s in zip(pile_paths, pile_sha, strict=True):
        by_sha.setdefault(s, []).append(p)

    items = list(test_images)
    tests = [image_label(t) for t in items]
    offenders: set[Offender] = set()
    test_hash = np.zeros(len(tests), dtype=np.uint64)
    for k, item in enumerate(items):
        test_hash[k] = perceptual_hash(_read_test_image(item, bands, value_range, max_pixels))
        for f in item if isinstance(item, tuple) else (item,):
            for p in by_sha.get(sha256_file(f), []):
                offenders.add(Offender(tests[k], p, "exact", 0))
    exact_pairs = {(o.test_path, o.pile_path) for o in offenders}
    i, j, d = hamming_join(test_hash, pile_hash, max_hamming)
    for a, b, dist in zip(i.tolist(), j.tolist(), d.tolist(), strict=True):
        if (tests[a], pile_paths[b]) not in exact_pairs:
            offenders.add(Offender(tests[a], pile_paths[b], "near", dist))
    return sorted(offenders, key=lambda o: (o.test_path, o.distance, o.pile_path))
