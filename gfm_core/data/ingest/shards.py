"""Training shards: each manifest image decoded and resized once, kept as uint8 in memory-mapped Arrow files.

Pretraining reads each image once per epoch for 100 epochs; decoding a JPEG/GeoTIFF costs more than the
augmentation itself. :func:`write_shards` decodes each good image of a manifest once (with
:func:`~gfm_core.data.raster.reader.read_image`, using the bands and value range recorded in its manifest row, which
are its source's), resizes it and writes it as 8-bit pixels; :class:`ShardDataset` and
:class:`~gfm_core.data.pretrain.stream.PretrainStream` read them back with no decoding and no copy.

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
import math
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from gfm_core.data.ingest.manifest import manifest_content_hash, read_manifest
from gfm_core.data.raster.reader import read_image
from gfm_core.data.raster.stretch import Stretch
from gfm_core.errors import ConfigError, DataValidationError, RasterReadError
from gfm_core.io import atomic_write, sha256_file, sha256_json, write_json

if TYPE_CHECKING:  # torch and torchvision load only with the readers: writer processes start in ~1 s
    import torch

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_SCHEMA = "gfm.geopile.shards"
SHARD_VERSION = 1
_GEN_RE = re.compile(r"^gen-[0-9a-f]{16}$")
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


# ----------------------------------------------------------------------------------------------- geometry


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


# -------------------------------------------------------------------------------------------------- writing


# path, source, sha256, bands, value_range, stretch (lo, hi) or None
_Row = tuple[str, str, str, tuple[int, ...], tuple[float, float], tuple[tuple[float, ...], tuple[float, ...]] | None]


@dataclass(frozen=True)
class _ShardTask:
    file: str  # final path of the shard
    data_root: str
    rows: tuple[_Row, ...]
    shard_size: int
    max_aspect: float


def _write_shard(task: _ShardTask) -> tuple[str, int, int]:
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


def _run_tasks(tasks: Sequence[_ShardTask], workers: int, progress: bool) -> list[tuple[str, int, int]]:
    from tqdm.auto import tqdm

    total = sum(len(t.rows) for t in tasks)
    out: list[tuple[str, int, int]] = []
    with tqdm(total=total, desc="shards", unit="img", disable=not progress) as bar:
        if workers == 0:
            for t in tasks:
                out.append(_write_shard(t))
                bar.update(len(t.rows))
            return out
        # forkserver, as in ingestion: the parent may hold threads (torch, dagster) and GDAL state
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending: set[Future[tuple[str, int, int]]] = {pool.submit(_write_shard, t) for t in tasks}
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

    sources = table.column("source").to_pylist()
    channels = table.column("channels").to_pylist()
    ranges = table.column("value_range").to_pylist()
    st = {k: (tuple(v.lo), tuple(v.hi)) for k, v in (stretch or {}).items()}
    rows = sorted(
        (paths[i], sources[i], shas[i], tuple(int(b) for b in channels[i]), (ranges[i][0], ranges[i][1]),
         st.get(sources[i]))
        for i in range(len(paths))
    )
    shard_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=shard_dir))
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    try:
        tasks = [
            _ShardTask(
                file=str(build / f"shard-{k:05d}.arrow"),
                data_root=str(data_root),
                rows=tuple(rows[s : s + images_per_shard]),
                shard_size=shard_size,
                max_aspect=float(max_aspect),
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
    for entry in shard_dir.iterdir():  # older generations and builds of crashed runs
        stale = _GEN_RE.match(entry.name) or entry.name.startswith(".build-")
        if entry.is_dir() and entry.name != generation and stale:
            shutil.rmtree(entry, ignore_errors=True)
    report = _report(shard_dir, index, rebuilt=True)
    log.info("shards: %d image(s) in %d file(s), %.1f MB", report.images, report.shards, report.bytes / 1e6)
    return report


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


# -------------------------------------------------------------------------------------------------- reading


def rank_partition(
    n: int, rank: int, world_size: int, *, seed: int | None = None, epoch: int = 0
) -> np.ndarray:
    """The global indexes rank ``rank`` of ``world_size`` reads: disjoint, equal-length, remainder dropped.

    Rank ``r`` takes every ``world_size``-th item starting at ``r`` of the global order, which is the manifest
    order (``seed=None``) or a permutation drawn from ``(seed, epoch)``; ranks stay disjoint in every epoch,
    and each gets a mix of every source. ``n % world_size`` items are left out (a different set each epoch
    when shuffled).

    Raises:
        ConfigError: ``world_size < 1``, ``rank`` outside ``[0, world_size)``, or fewer items than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} must lie in [0, world_size={world_size})")
    if n < world_size:
        raise ConfigError(f"{n} item(s) cannot be split over {world_size} ranks (each needs at least one)")
    per_rank = n // world_size
    if seed is None:
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    return order[rank : per_rank * world_size : world_size]


class _Shards:
    """The memory-mapped shard files of one generation (opened lazily, once per process)."""

    def __init__(self, shard_dir: Path, index: dict[str, Any]) -> None:
        import torch

        self.files = [shard_dir / s["file"] for s in index["shards"]]
        self.counts = [int(s["images"]) for s in index["shards"]]
        n = sum(self.counts)
        self.buffer = np.empty(n, dtype=np.int32)  # which data buffer holds item i
        self.start = np.empty(n, dtype=np.int64)
        self.shape = np.empty((n, 3), dtype=np.int64)  # H, W, C
        self.paths: list[str] = []
        self.sources: list[str] = []
        self.sha256: list[str] = []
        self.data: list[torch.Tensor] = []
        self._maps: list[pa.MemoryMappedFile] = []
        pos = 0
        for file, count in zip(self.files, self.counts, strict=True):
            try:
                mm = pa.memory_map(str(file), "r")
                reader = pa.ipc.open_file(mm)
                if not reader.schema.equals(SHARD_SCHEMA):
                    raise DataValidationError(f"{file}: not a gfm shard (schema {reader.schema})")
                seen = 0
                for b in range(reader.num_record_batches):
                    rb = reader.get_batch(b)
                    col = rb.column("pixels")
                    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[
                        col.offset : col.offset + len(col) + 1
                    ]
                    with warnings.catch_warnings():  # read-only mapping: items are views, never written
                        warnings.simplefilter("ignore", UserWarning)
                        data = torch.from_numpy(np.frombuffer(col.buffers()[2], dtype=np.uint8))
                    k = len(col)
                    if seen + k > count:
                        raise DataValidationError(
                            f"{file}: holds more images than the {count} index.json lists; rebuild the shards"
                        )
                    sl = slice(pos + seen, pos + seen + k)
                    self.buffer[sl] = len(self.data)
                    self.start[sl] = offsets[:-1]
                    self.shape[sl, 0] = rb.column("height").to_numpy()
                    self.shape[sl, 1] = rb.column("width").to_numpy()
                    self.shape[sl, 2] = rb.column("channels").to_numpy()
                    self.paths.extend(rb.column("path").to_pylist())
                    self.sources.extend(rb.column("source").to_pylist())
                    self.sha256.extend(rb.column("sha256").to_pylist())
                    self.data.append(data)
                    seen += k
                self._maps.append(mm)
            except (OSError, pa.ArrowException) as e:
                raise DataValidationError(
                    f"{file}: cannot read the shard ({e}); rebuild the shards with write_shards"
                ) from e
            if seen != count:
                raise DataValidationError(
                    f"{file}: holds {seen} image(s), index.json says {count}; rebuild the shards"
                )
            pos += count

    def view(self, i: int) -> torch.Tensor:
        """Item ``i`` (global) as a read-only uint8 ``[C, H, W]`` view of the mapping."""
        h, w, c = self.shape[i]
        s = int(self.start[i])
        flat = self.data[self.buffer[i]][s : s + h * w * c]
        return flat.view(int(h), int(w), int(c)).permute(2, 0, 1)


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


class ShardDataset:
    """This rank's share of the shard images, as uint8 ``[C, H, W]`` tensors (no decoding, no copy).

    A map-style dataset (``__len__`` and ``__getitem__``) for :class:`torch.utils.data.DataLoader`; pickling
    it (to loader workers) sends only paths and indexes, and each process maps the files itself.

    Args:
        shard_dir: folder written by :func:`write_shards`.
        rank: this process's rank.
        world_size: number of ranks; each gets ``images // world_size`` items, disjoint from the others'.
        seed: None = a fixed split (rank ``r`` reads global items ``r, r + W, ...``); an int = a new split per
            epoch drawn from ``(seed, epoch)`` (see :func:`rank_partition` and :meth:`set_epoch`).

    Raises:
        DataValidationError: the index or a shard is missing or unreadable.
        ConfigError: bad rank/world size, or fewer images than ranks.
    """

    def __init__(
        self, shard_dir: str | Path, *, rank: int = 0, world_size: int = 1, seed: int | None = None
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.index = load_shard_index(self.shard_dir)
        self.content_hash: str = self.index["manifest_content_hash"]
        self.total = int(self.index["images"])
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.indices = rank_partition(self.total, rank, world_size, seed=seed)
        self._shards: _Shards | None = None

    @property
    def shards(self) -> _Shards:
        """The mapped shard files (opened on first use in each process)."""
        if self._shards is None:
            self._shards = _Shards(self.shard_dir, self.index)
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"] = None  # memory maps are reopened in the receiving process, never pickled
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (re-splits the ranks when ``seed`` is set)."""
        self.epoch = epoch
        if self.seed is not None:
            self.indices = rank_partition(self.total, self.rank, self.world_size, seed=self.seed, epoch=epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def global_index(self, index: int) -> int:
        """The position in the whole pile (sorted by path) of this rank's item ``index``."""
        return int(self.indices[index])

    def view(self, index: int) -> torch.Tensor:
        """Item ``index`` as a zero-copy, read-only uint8 ``[C, H, W]`` view (channels-last strides).

        The memory is the read-only file mapping: never modify it in place (use ``__getitem__`` for a copy).
        """
        return self.shards.view(self.global_index(index))

    def path(self, index: int) -> str:
        """Item ``index``'s path relative to the data root."""
        return self.shards.paths[self.global_index(index)]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Item ``index`` as a writable uint8 ``[C, H, W]`` copy."""
        import torch

        return self.view(index).clone(memory_format=torch.contiguous_format)
