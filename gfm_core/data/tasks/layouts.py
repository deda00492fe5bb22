"""Downstream task layouts read from local folders (never downloaded), in the layouts users already have.

Layouts (``TaskCfg.layout``; the torchgeo ones follow torchgeo 0.8's ``download=False`` folder structure):

=============  ===============================================================================================
ucmerced       ``UCMerced_LandUse/Images/<class>/<name>`` + ``uc_merced-<split>.txt`` (one basename a line)
resisc45       ``NWPU-RESISC45/<class>/<name>.jpg`` + ``resisc45-<split>.txt``
eurosat        ``ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<name>.tif`` +
               ``eurosat-<split>.txt`` (names may end in ``.jpg``; they are read as ``.tif``)
bigearthnet    v1: ``bigearthnet-<split>.csv`` (``s2_patch,s1_patch``) +
               ``BigEarthNet-v1.0/<patch>/<patch>_<B..>.tif``
               and ``<patch>_labels_metadata.json``; 43 CLC names mapped to the 19 classes (torchgeo's table)
oscd           ``Onera Satellite Change Detection dataset - Images/<region>/imgs_{1,2}_rect/<B..>.tif`` +
               ``Onera Satellite Change Detection dataset - {Train,Test} Labels/<region>/cm/cm.png``
               (no val split)
levircd        ``{A,B,label}/<split>_<n>.png`` (masks 0/255)
folders        ``<split>/<dir>/<stem>.<ext>`` matched by stem across ``TaskCfg.dirs``: ``images,masks``
               (segmentation: Vaihingen, WHU Aerial, ...), ``A,B,label`` (change: DSIFN), ``lr,hr`` (superres:
               SpaceNet2). Large images can be cut into ``tile_size`` tiles.
geobench       ``<split>/<id>.tif`` + ``labels.csv`` (id, split, label_idx) + ``classes.json``: GEO-Bench-2-style
               multi-label sets (BigEarthNet v2, TreeSatAI); a single-label view for classification
               (:mod:`~gfm_core.data.tasks.geobench`)
=============  ===============================================================================================

:func:`list_task` lists a split as :class:`~gfm_core.data.tasks.index.SampleRef` items (cut into tiles when
``TaskCfg.tile_size`` is set); :class:`~gfm_core.data.tasks.dataset.TaskDataset` reads them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from gfm_core.config import TaskCfg
from gfm_core.data.tasks.bigearthnet import list_bigearthnet
from gfm_core.data.tasks.geobench import list_geobench
from gfm_core.data.tasks.index import (
    IMAGE_SUFFIXES,
    SPLITS,
    DatasetNotFoundError,
    SampleRef,
    TaskIndex,
    check_split,
    class_folder_index,
    natural_key,
    need_dir,
    split_lines,
)
from gfm_core.errors import ConfigError, DataValidationError, RasterReadError
from gfm_core.task_heads import get_head

OSCD_IMAGES = "Onera Satellite Change Detection dataset - Images"
OSCD_LABELS = "Onera Satellite Change Detection dataset - {} Labels"
EUROSAT_DIR = Path("ds/images/remote_sensing/otherDatasets/sentinel_2/tif")


# ------------------------------------------------------------------------------------------------ layouts


def _list_scene_folder(
    cfg: TaskCfg, split: str, base: Path, split_file: Path, rename: Callable[[str], str] = lambda n: n
) -> TaskIndex:
    classes, index = class_folder_index(base, cfg)
    refs = []
    for name in split_lines(split_file, cfg):
        key = rename(name)
        if key not in index:
            raise DatasetNotFoundError(
                base / "<class>" / key,
                f"image listed in {split_file.name}",
                cfg,
                "the split list names a file that is in no class folder",
            )
        path, label = index[key]
        refs.append(SampleRef(id=Path(key).stem, files={"image": path}, label=label))
    return TaskIndex(refs, classes)


def list_ucmerced(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo UCMerced: ``UCMerced_LandUse/Images/<class>/*`` + ``uc_merced-<split>.txt``."""
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    return _list_scene_folder(
        cfg, split, root / "UCMerced_LandUse" / "Images", root / f"uc_merced-{split}.txt"
    )


def list_resisc45(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo RESISC45: ``NWPU-RESISC45/<class>/*.jpg`` + ``resisc45-<split>.txt``."""
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    return _list_scene_folder(cfg, split, root / "NWPU-RESISC45", root / f"resisc45-{split}.txt")


def list_eurosat(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo EuroSAT (13-band GeoTIFFs): ``ds/.../tif/<Class>/*.tif`` + ``eurosat-<split>.txt``."""
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    return _list_scene_folder(
        cfg,
        split,
        root / EUROSAT_DIR,
        root / f"eurosat-{split}.txt",
        rename=lambda n: re.sub(r"\.jpg$", ".tif", n, flags=re.IGNORECASE),
    )

def list_oscd(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo OSCD: one sample per region (``tile_size`` cuts the regions into tiles)."""
    check_split(cfg, split, ("train", "test"))
    root = need_dir(cfg.root, "dataset root", cfg)
    images = need_dir(root / OSCD_IMAGES, "OSCD image folder", cfg)
    labels = need_dir(root / OSCD_LABELS.format(split.capitalize()), f"OSCD {split} label folder", cfg)
    refs = []
    for region in sorted(d.name for d in labels.iterdir() if d.is_dir()):
        pair = [
            tuple(images / region / f"imgs_{t}_rect" / f"{b}.tif" for b in cfg.band_files) for t in (1, 2)
        ]
        refs.append(
            SampleRef(
                id=region, files={"A": pair[0], "B": pair[1], "label": labels / region / "cm" / "cm.png"}
            )
        )
    if not refs:
        raise DatasetNotFoundError(labels / "<region>", "OSCD region folders", cfg)
    return TaskIndex(refs)


def list_levircd(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo LEVIR-CD: flat ``A/``, ``B/``, ``label/`` folders, split as a file-name prefix."""
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    a_dir = need_dir(root / "A", "LEVIR-CD A folder", cfg)
    names = sorted((p.name for p in a_dir.glob(f"{split}_*.png")), key=natural_key)
    if not names:
        raise DatasetNotFoundError(a_dir / f"{split}_*.png", f"{split} images", cfg)
    refs = [
        SampleRef(id=Path(n).stem, files={"A": a_dir / n, "B": root / "B" / n, "label": root / "label" / n})
        for n in names
    ]
    return TaskIndex(refs)


def _stem_index(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def list_folders(cfg: TaskCfg, split: str) -> TaskIndex:
    """Generic folders matched by file stem; the first of ``dirs`` lists the samples.

    A dir is ``<root>/<split>/<dir>``, or ``<root>/<dir>`` with ``{split}`` formatted in (MMSegmentation's
    ``img_dir/{split}``, ``ann_dir/{split}``).
    """
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    spec = get_head(cfg.head)
    dirs = cfg.dirs or spec.dirs
    expected = len(spec.dirs)
    if len(dirs) != expected:
        raise ConfigError(
            f"task {cfg.name!r}: dirs {list(dirs)} must name {expected} folders for a {cfg.head} task "
            f"(default {list(spec.dirs)})"
        )
    folders = [root / d.format(split=split) if "{split}" in d else root / split / d for d in dirs]
    indexes = [
        _stem_index(need_dir(f, f"{split} {d} folder", cfg)) for f, d in zip(folders, dirs, strict=True)
    ]
    stems = sorted(indexes[0], key=natural_key)
    if not stems:
        raise DatasetNotFoundError(folders[0] / "*", f"{split} images", cfg)
    refs = []
    for stem in stems:
        files: dict[str, Path | tuple[Path, ...]] = {}
        for key, folder, index in zip(spec.files, folders, indexes, strict=True):
            if stem not in index:
                raise DatasetNotFoundError(
                    folder / f"{stem}.*",
                    f"counterpart of {indexes[0][stem]}",
                    cfg,
                    f"every file in {folders[0]} needs a file with the same name in {folder}",
                )
            files[key] = index[stem]
        refs.append(SampleRef(id=stem, files=files))
    return TaskIndex(refs)


LAYOUTS: dict[str, Callable[[TaskCfg, str], TaskIndex]] = {
    "ucmerced": list_ucmerced,
    "resisc45": list_resisc45,
    "eurosat": list_eurosat,
    "bigearthnet": list_bigearthnet,
    "oscd": list_oscd,
    "levircd": list_levircd,
    "folders": list_folders,
    "geobench": list_geobench,
}


def task_splits(cfg: TaskCfg) -> tuple[str, ...]:
    """The splits ``cfg``'s layout has (OSCD ships no val split)."""
    return ("train", "test") if cfg.layout == "oscd" else SPLITS


def list_task(cfg: TaskCfg, split: str) -> TaskIndex:
    """The samples of one split (tiled when ``cfg.tile_size`` is set).

    Raises:
        DatasetNotFoundError: the root, a layout folder, a split list or a listed file is missing.
        ConfigError: unknown layout or split.
    """
    if cfg.layout not in LAYOUTS:
        raise ConfigError(
            f"task {cfg.name!r}: unknown layout {cfg.layout!r}; valid: {', '.join(sorted(LAYOUTS))}"
        )
    index = LAYOUTS[cfg.layout](cfg, split)
    if cfg.tile_size:
        index = TaskIndex(_tile_refs(index.refs, cfg), index.classes, index.meta)
    return index


# ------------------------------------------------------------------------------------------------ tiling


def _tile_starts(size: int, tile: int) -> list[int]:
    starts = list(range(0, size - tile + 1, tile))
    if starts and starts[-1] + tile < size:
        starts.append(size - tile)  # the last tile overlaps so the whole image is covered
    return starts


def _raster_size(path: Path) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return int(src.height), int(src.width)
    except RasterioIOError as e:
        raise RasterReadError(path, f"cannot read ({e})") from e


def _tile_refs(refs: list[SampleRef], cfg: TaskCfg) -> list[SampleRef]:
    tile = int(cfg.tile_size or 0)
    files = get_head(cfg.head).files
    key = files[-1] if files else "image"  # tiles are cut on the label's grid
    if cfg.head == "superres" and tile % cfg.scale:
        raise ConfigError(f"task {cfg.name!r}: tile_size {tile} must be divisible by scale {cfg.scale}")
    out = []
    for ref in refs:
        first = ref.files[key]
        h, w = _raster_size(first[0] if isinstance(first, tuple) else first)
        if h < tile or w < tile:
            raise DataValidationError(
                f"{first}: {w}x{h} px is smaller than tile_size {tile} (task {cfg.name!r})"
            )
        for r in _tile_starts(h, tile):
            for c in _tile_starts(w, tile):
                out.append(replace(ref, id=f"{ref.id}@{r}_{c}", window=(c, r, tile, tile)))
    return out
