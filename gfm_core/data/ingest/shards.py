"""Training shards: each manifest image decoded and resized once, kept as uint8 in memory-mapped Arrow files.

Pretraining reads each image once per epoch for 100 epochs; decoding a JPEG/GeoTIFF costs more than the
augmentation itself. :func:`write_shards` decodes each good image of a manifest once (with
:func:`~gfm_core.data.raster.reader.read_image`, using the bands and value range recorded in its manifest row,
which are its source's), resizes it and writes it as 8-bit pixels
(:func:`~gfm_core.data.ingest.shard_file.write_shard`); :class:`~gfm_core.data.pretrain.shard_dataset.ShardDataset`
and :class:`~gfm_core.data.pretrain.stream.PretrainStream` read them back with no decoding and no copy.

Format: Arrow IPC files (the Feather v2 format), uncompressed, one per ~``images_per_shard`` images
(``<gen>/shard-00000.arrow``), columns ``path, source, sha256, channels, height, width, pixels``; ``pixels``
is a ``large_binary`` cell holding the image as uint8 ``[H, W, C]`` (channels-last). Why:

- *Zero-copy random access.* An uncompressed IPC file is the in-memory layout on disk: ``pyarrow.memory_map``
  plus ``ipc.open_file`` maps it, and an image is a slice of the mapped data buffer that
  ``torch.from_numpy`` wraps without copying or parsing (microseconds; the page cache does the IO and is
  shared by every DataLoader worker and every rank on a node).
- *Self-describing and well kept.* Apache Arrow is a versioned cross-language standard; each shard carries
  its own paths, hashes and shapes, so a shard can be inspected or verified on its own with pyarrow, polars
  or DuckDB, with nothing custom to maintain and no new dependency (pyarrow already writes the manifest).
- *Channels-last uint8.* 1 byte per sample (4x less IO and page cache than float32), and a channels-last
  ``[C, H, W]`` view takes torch's vectorised uint8 antialiased resize, about 1.6x faster than planar.
- Compression (zstd/lz4) would cost a decode per read again, for little gain on photographic pixels.
  Numpy ``.npy`` memmaps would be as fast but need a separate index; WebDataset/LitData/FFCV/MosaicML
  streaming are new dependencies built around re-decoding compressed samples.

Geometry: an image whose short side exceeds ``shard_size`` is resized (antialiased bilinear, in float, then
rounded to uint8) so its short side is ``shard_size``; smaller images are stored at their own size (the
training crop upsamples them once instead of twice); images more elongated than ``max_aspect`` keep only a
centred ``max_aspect:1`` region of the long side. ``shard_size=256`` keeps GeoPile's 256 px chips (RESISC45,
PatternNet, ...) pixel-exact, so training on shards sees the same pixels as training on the files; a
RandomResizedCrop to 192 px with area >= 0.67 rarely upsamples from 256 px.

Lineage and atomicity: ``index.json`` records the manifest's content hash and the settings; a rebuild is
skipped when both are unchanged. Shards are written into a hidden build folder (each file temp + rename),
the folder is renamed to its generation name, and ``index.json`` is replaced last, so readers only ever see
complete shards of one generation; a failed build leaves the previous generation in place.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from gfm_core.data.ingest.manifest import manifest_content_hash, read_manifest
from gfm_core.data.ingest.shard_file import ShardRow, ShardTask, write_shard
from gfm_core.data.raster.stretch import Stretch
from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.io import sha256_json, write_json

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_SCHEMA = "gfm.geopile.shards"
SHARD_VERSION = 1
_GEN_RE = re.compile(r"^gen-[0-9a-f]{16}$")


@dataclass(frozen=True)
class ShardReport:
    """What :func:`write_shards` did.

    Attributes:
        shard_dir: the folder holding ``index.json`` and the current generation.
        index_path: ``<shard_dir>/index.json``.
        content_hash: the manifest's content hash the shards were built from.
        images: images in the shards (= manifest rows).
        shards: shard files.
        bytes: total size of the shard files.
        rebuilt: False when the existing shards already matched the manifest and settings.
    """

    shard_dir: Path
    index_path: Path
    content_hash: str
    images: int
    shards: int
    bytes: int
    rebuilt: bool



def _run_tasks(tasks: Sequence[ShardTask], workers: int, progress: bool) -> list[tuple[str, int, int]]:
    from tqdm.auto import tqdm

    total = sum(len(t.rows) for t in tasks)
    out: list[tuple[str, int, int]] = []
    with tqdm(total=total, desc="shards", unit="img", disable=not progress) as bar:
        if workers == 0:
            for t in tasks:
                out.append(write_shard(t))
                bar.update(len(t.rows))
            return out
        # forkserver, as in ingestion: the parent may hold threads (torch, dagster) and GDAL state
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([write_shard.__module__])
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending: set[Future[tuple[str, int, int]]] = {pool.submit(write_shard, t) for t in tasks}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        res = fut.result()  # re-raises the worker's DataValidationError
                        out.append(res)
                        bar.update(res[1])
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    return sorted(out)


def _settings(
    shard_size: int, max_aspect: float, images_per_shard: int, stretch: Mapping[str, Stretch] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": SHARD_VERSION,
        "shard_size": shard_size,
        "max_aspect": max_aspect,
        "images_per_shard": images_per_shard,
        "layout": "uint8 HWC, short side <= shard_size, antialiased bilinear",
    }
    if stretch:  # absent when off, so shards written before stretches existed stay current
        out["stretch"] = {k: {"lo": list(v.lo), "hi": list(v.hi)} for k, v in sorted(stretch.items())}
    return out


def _current_index(shard_dir: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((shard_dir / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("schema") == INDEX_SCHEMA else None


def _index_complete(shard_dir: Path, index: dict[str, Any]) -> bool:
    try:
        return all((shard_dir / s["file"]).stat().st_size == s["bytes"] for s in index["shards"])
    except (OSError, KeyError, TypeError):
        return False


def write_shards(
    manifest: str | Path,
    shard_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    shard_size: int = 256,
    max_aspect: float = 2.0,
    images_per_shard: int = 512,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    stretch: Mapping[str, Stretch] | None = None,
) -> ShardReport:
    """Decode every image of ``manifest`` once into uint8 Arrow shards under ``shard_dir``.

    Args:
        manifest: ``manifest.parquet`` from :func:`~gfm_core.data.ingest.manifest.build_manifest`.
        shard_dir: output folder (``index.json`` plus one generation folder of ``shard-NNNNN.arrow``).
        data_root: the folder the manifest's paths are relative to; None = the one recorded in the manifest.
        shard_size: short side, in pixels, that larger images are resized to.
        max_aspect: images longer than this times their short side keep only a centred region.
        images_per_shard: images per shard file (the last one holds the rest).
        workers: writer processes; None = ``os.cpu_count()``; 0 = this process.
        progress: show a tqdm bar on stderr.
        force: rebuild even when the shards already match the manifest and settings.
        stretch: per-source contrast stretch applied before the 8-bit quantisation (sources not listed: none).

    Returns:
        The :class:`ShardReport` (``rebuilt=False`` when the existing shards were kept).

    Raises:
        ConfigError: a setting is out of range, or the data root is unknown.
        DataValidationError: the manifest cannot be read or is empty, or an image changed or became
            unreadable since ingestion (nothing is published then: the previous shards stay current).
    """
    if shard_size < 1 or images_per_shard < 1 or not max_aspect >= 1:
        raise ConfigError(
            f"shard_size ({shard_size}) and images_per_shard ({images_per_shard}) must be >= 1 and "
            f"max_aspect ({max_aspect}) >= 1"
        )
    table, data_root = _read_manifest(manifest, data_root)
    paths = table.column("path").to_pylist()
    shas = table.column("sha256").to_pylist()
    content = manifest_content_hash(zip(paths, shas, strict=True))
    settings = _settings(shard_size, float(max_aspect), images_per_shard, stretch)
    shard_dir = Path(shard_dir)
    generation = "gen-" + sha256_json({"content": content, "settings": settings})[:16]

    current = _current_index(shard_dir)
    if (
        not force
        and current is not None
        and current.get("manifest_content_hash") == content
        and current.get("settings") == settings
        and _index_complete(shard_dir, current)
    ):
        log.info("shards in %s already match manifest %s; not rebuilt", shard_dir, content[:12])
        return _report(shard_dir, current, rebuilt=False)

    rows = _rows(table, paths, shas, stretch)
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    results = _build(rows, shard_dir, generation, data_root, shard_size, float(max_aspect), images_per_shard,
                     n_workers, progress)
    index = {
        "schema": INDEX_SCHEMA,
        "version": SHARD_VERSION,
        "manifest_content_hash": content,
        "manifest": str(manifest),
        "settings": settings,
        "images": len(rows),
        "shards": [
            {"file": f"{generation}/{Path(f).name}", "images": n, "bytes": size} for f, n, size in results
        ],
    }
    write_json(shard_dir / INDEX_NAME, index)
    _remove_stale(shard_dir, generation)
    report = _report(shard_dir, index, rebuilt=True)
    log.info("shards: %d image(s) in %d file(s), %.1f MB", report.images, report.shards, report.bytes / 1e6)
    return report


def _remove_stale(shard_dir: Path, generation: str) -> None:
    """Delete older generations and the build folders of crashed runs."""
    for entry in shard_dir.iterdir():
        stale = _GEN_RE.match(entry.name) or entry.name.startswith(".build-")
        if entry.is_dir() and entry.name != generation and stale:
            shutil.rmtree(entry, ignore_errors=True)


def _read_manifest(manifest: str | Path, data_root: str | Path | None) -> tuple[pa.Table, str | Path]:
    """The manifest table, checked for shard writing, and the data root (None = the one it records)."""
    table = read_manifest(manifest)
    if table.num_rows == 0:
        raise DataValidationError(f"{manifest}: the manifest has no images to write into shards")
    for col in ("channels", "value_range"):
        if col not in table.column_names:
            raise DataValidationError(f"{manifest}: missing column {col!r} (rebuild it with build_manifest)")
    meta = table.schema.metadata or {}
    if data_root is None:
        recorded = meta.get(b"gfm.data_root")
        if recorded is None:
            raise ConfigError(f"{manifest}: no data root recorded in the manifest; pass data_root")
        data_root = recorded.decode()
    return table, data_root


def _rows(
    table: pa.Table, paths: list[str], shas: list[str], stretch: Mapping[str, Stretch] | None
) -> list[ShardRow]:
    """One :data:`ShardRow` per manifest image, sorted by path."""
    sources = table.column("source").to_pylist()
    channels = table.column("channels").to_pylist()
    ranges = table.column("value_range").to_pylist()
    st = {k: (tuple(v.lo), tuple(v.hi)) for k, v in (stretch or {}).items()}
    return sorted(
        (paths[i], sources[i], shas[i], tuple(int(b) for b in channels[i]), (ranges[i][0], ranges[i][1]),
         st.get(sources[i]))
        for i in range(len(paths))
    )


def _build(
    rows: list[ShardRow],
    shard_dir: Path,
    generation: str,
    data_root: str | Path,
    shard_size: int,
    max_aspect: float,
    images_per_shard: int,
    n_workers: int,
    progress: bool,
) -> list[tuple[str, int, int]]:
    """Write every shard into a hidden build folder, then rename it to ``generation`` (removed on failure)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=shard_dir))
    try:
        tasks = [
            ShardTask(
                file=str(build / f"shard-{k:05d}.arrow"),
                data_root=str(data_root),
                rows=tuple(rows[s : s + images_per_shard]),
                shard_size=shard_size,
                max_aspect=max_aspect,
            )
            for k, s in enumerate(range(0, len(rows), images_per_shard))
        ]
        log.info("writing %d image(s) into %d shard(s) with %d worker(s)", len(rows), len(tasks), n_workers)
        results = _run_tasks(tasks, min(n_workers, len(tasks)), progress)
        final = shard_dir / generation
        if final.exists():  # left by a run that died between the rename and the index: not referenced
            shutil.rmtree(final)
        os.rename(build, final)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return results


def _report(shard_dir: Path, index: dict[str, Any], *, rebuilt: bool) -> ShardReport:
    return ShardReport(
        shard_dir=shard_dir,
        index_path=shard_dir / INDEX_NAME,
        content_hash=index["manifest_content_hash"],
        images=int(index["images"]),
        shards=len(index["shards"]),
        bytes=sum(int(s["bytes"]) for s in index["shards"]),
        rebuilt=rebuilt,
    )


def load_shard_index(shard_dir: str | Path) -> dict[str, Any]:
    """Read and check ``<shard_dir>/index.json``.

    Raises:
        DataValidationError: missing, unreadable, another schema or version, or a shard file is missing.
    """
    path = Path(shard_dir) / INDEX_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataValidationError(
            f"{path}: cannot read the shard index ({e}); build the shards with write_shards"
        ) from e
    if not isinstance(raw, dict) or raw.get("schema") != INDEX_SCHEMA:
        raise DataValidationError(f"{path}: not a {INDEX_SCHEMA} index")
    if raw.get("version") != SHARD_VERSION:
        raise DataValidationError(
            f"{path}: shard format version {raw.get('version')!r}, this code reads {SHARD_VERSION}; rebuild"
        )
    missing = [s["file"] for s in raw["shards"] if not (Path(shard_dir) / s["file"]).is_file()]
    if missing:
        raise DataValidationError(f"{path}: shard file(s) missing: {missing[:3]}; rebuild the shards")
    return raw
