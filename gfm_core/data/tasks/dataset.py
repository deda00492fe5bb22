"""Downstream task datasets read from local folders (never downloaded), in the layouts users already have.

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
=============  ===============================================================================================

A sample is a dict: ``image`` ``[C, S, S]`` float32 (``S = img_size``; change pairs ``[2, C, S, S]``)
scaled to [0, 1] with ``value_range`` (DN 0..255 -> [0, 1] like the pretraining pile) and normalised with the
backbone's mean/std; then ``label`` (int64 class), ``label`` (float32 multi-hot ``[L]``), ``mask`` (int64
``[H, W]`` at the label's native size; change: 1 = change) or ``target`` (float32 ``[C, H, W]`` HR image in
[0, 1]); plus
``index`` (position in the split) and ``id`` (a stable sample name that pairs results across models).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from torch import Tensor
from torch.utils.data import Dataset

from gfm_core.config import TaskCfg
from gfm_core.data.raster.reader import read_image
from gfm_core.data.raster.stretch import Stretch
from gfm_core.errors import ConfigError, DataValidationError, RasterReadError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
OSCD_IMAGES = "Onera Satellite Change Detection dataset - Images"
OSCD_LABELS = "Onera Satellite Change Detection dataset - {} Labels"
EUROSAT_DIR = Path("ds/images/remote_sensing/otherDatasets/sentinel_2/tif")
DEFAULT_DIRS = {"segmentation": ("images", "masks"), "change": ("A", "B", "label"), "superres": ("lr", "hr")}

#: BigEarthNet's 43 CLC level-3 names (label json) and their 19-class indices (torchgeo ``label_converter``).
BEN43: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)
BEN19: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
BEN43_TO_19: dict[int, int] = {
    0: 0,
    1: 0,
    2: 1,
    11: 2,
    12: 2,
    13: 2,
    14: 3,
    15: 3,
    16: 3,
    18: 3,
    17: 4,
    19: 5,
    20: 6,
    21: 7,
    22: 8,
    23: 9,
    24: 10,
    25: 11,
    31: 11,
    26: 12,
    27: 12,
    28: 13,
    29: 14,
    33: 15,
    34: 15,
    35: 16,
    36: 16,
    38: 17,
    39: 17,
    40: 18,
    41: 18,
    42: 18,
}  # the 43-class labels missing here (roads, ports, airports, bare rock, burnt areas, ...) are dropped


class DatasetNotFoundError(DataValidationError, FileNotFoundError):
    """A task's folder, split list or file is missing; the message names the path and the fix."""

    def __init__(self, path: str | Path, what: str, cfg: TaskCfg | None = None, fix: str = "") -> None:
        where = f" (task {cfg.name!r}, layout {cfg.layout!r}, root {cfg.root})" if cfg is not None else ""
        hint = fix or "check finetune.tasks[].root and the layout; nothing is downloaded"
        super().__init__(f"{path}: {what} not found{where}; {hint}")
        self.path = Path(path)


@dataclass(frozen=True)
class SampleRef:
    """One sample before reading: its files, its label (classification) and an optional tile window."""

    id: str
    files: dict[str, Path | tuple[Path, ...]]
    label: int | None = None
    window: tuple[int, int, int, int] | None = None  # col_off, row_off, width, height (label/HR grid)


@dataclass(frozen=True)
class TaskIndex:
    """A split of a task: its samples and label names (empty for change/superres)."""

    refs: list[SampleRef]
    classes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers


def _need_dir(path: Path, what: str, cfg: TaskCfg) -> Path:
    if not path.is_dir():
        raise DatasetNotFoundError(path, what, cfg)
    return path


def _need_file(path: Path, what: str, cfg: TaskCfg) -> Path:
    if not path.is_file():
        raise DatasetNotFoundError(path, what, cfg)
    return path


def _split_lines(path: Path, cfg: TaskCfg) -> list[str]:
    _need_file(path, "split list", cfg)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _class_folder_index(base: Path, cfg: TaskCfg) -> tuple[tuple[str, ...], dict[str, tuple[Path, int]]]:
    """``base/<class>/<file>`` -> sorted class names and ``{file name: (path, class index)}``."""
    _need_dir(base, "image folder", cfg)
    classes = tuple(sorted(d.name for d in base.iterdir() if d.is_dir()))
    if not classes:
        raise DatasetNotFoundError(base, "class subfolders", cfg)
    index: dict[str, tuple[Path, int]] = {}
    for i, c in enumerate(classes):
        for f in (base / c).iterdir():
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                index[f.name] = (f, i)
    return classes, index


def _check_split(cfg: TaskCfg, split: str, valid: Sequence[str] = SPLITS) -> None:
    if split not in valid:
        raise ConfigError(
            f"task {cfg.name!r} ({cfg.layout}): unknown split {split!r}; valid: {', '.join(valid)}"
        )


# ------------------------------------------------------------------------------------------------ layouts


def _list_scene_folder(
    cfg: TaskCfg, split: str, base: Path, split_file: Path, rename: Callable[[str], str] = lambda n: n
) -> TaskIndex:
    classes, index = _class_folder_index(base, cfg)
    refs = []
    for name in _split_lines(split_file, cfg):
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
    _check_split(cfg, split)
    root = _need_dir(cfg.root, "dataset root", cfg)
    return _list_scene_folder(
        cfg, split, root / "UCMerced_LandUse" / "Images", root / f"uc_merced-{split}.txt"
    )


def list_resisc45(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo RESISC45: ``NWPU-RESISC45/<class>/*.jpg`` + ``resisc45-<split>.txt``."""
    _check_split(cfg, split)
    root = _need_dir(cfg.root, "dataset root", cfg)
    return _list_scene_folder(cfg, split, root / "NWPU-RESISC45", root / f"resisc45-{split}.txt")


def list_eurosat(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo EuroSAT (13-band GeoTIFFs): ``ds/.../tif/<Class>/*.tif`` + ``eurosat-<split>.txt``."""
    _check_split(cfg, split)
    root = _need_dir(cfg.root, "dataset root", cfg)
    return _list_scene_folder(
        cfg,
        split,
        root / EUROSAT_DIR,
        root / f"eurosat-{split}.txt",
        rename=lambda n: re.sub(r"\.jpg$", ".tif", n, flags=re.IGNORECASE),
    )


def bigearthnet_classes(cfg: TaskCfg) -> tuple[tuple[str, ...], bool]:
    """Label names and whether BigEarthNet's 43 -> 19 mapping applies.

    ``cfg.classes`` when set; else the ``classes`` of ``root/info.json`` (the demo task); else the 19 classes.
    """
    if cfg.classes is not None:
        return tuple(cfg.classes), False
    info = cfg.root / "info.json"
    if info.is_file():
        classes = json.loads(info.read_text()).get("classes")
        if isinstance(classes, dict):
            return tuple(classes[k] for k in sorted(classes, key=_natural_key)), False
        if isinstance(classes, list):
            return tuple(classes), False
    return BEN19, True


def list_bigearthnet(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo BigEarthNet v1 (Sentinel-2 part): split csv + per-patch band files and label json."""
    _check_split(cfg, split)
    root = _need_dir(cfg.root, "dataset root", cfg)
    patches = _need_dir(root / "BigEarthNet-v1.0", "Sentinel-2 patch folder", cfg)
    classes, ben19 = bigearthnet_classes(cfg)
    refs = []
    for line in _split_lines(root / f"bigearthnet-{split}.csv", cfg):
        patch = line.split(",")[0].strip()
        folder = patches / patch
        bands = tuple(folder / f"{patch}_{b}.tif" for b in cfg.band_files)
        refs.append(
            SampleRef(id=patch, files={"image": bands, "labels": folder / f"{patch}_labels_metadata.json"})
        )
    return TaskIndex(refs, classes, {"ben19": ben19})


def list_oscd(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo OSCD: one sample per region (``tile_size`` cuts the regions into tiles)."""
    _check_split(cfg, split, ("train", "test"))
    root = _need_dir(cfg.root, "dataset root", cfg)
    images = _need_dir(root / OSCD_IMAGES, "OSCD image folder", cfg)
    labels = _need_dir(root / OSCD_LABELS.format(split.capitalize()), f"OSCD {split} label folder", cfg)
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
    _check_split(cfg, split)
    root = _need_dir(cfg.root, "dataset root", cfg)
    a_dir = _need_dir(root / "A", "LEVIR-CD A folder", cfg)
    names = sorted((p.name for p in a_dir.glob(f"{split}_*.png")), key=_natural_key)
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
    _check_split(cfg, split)
    root = _need_dir(cfg.root, "dataset root", cfg)
    dirs = cfg.dirs or DEFAULT_DIRS[cfg.head]
    expected = len(DEFAULT_DIRS[cfg.head])
    if len(dirs) != expected:
        raise ConfigError(
            f"task {cfg.name!r}: dirs {list(dirs)} must name {expected} folders for a {cfg.head} task "
            f"(default {list(DEFAULT_DIRS[cfg.head])})"
        )
    folders = [root / d.format(split=split) if "{split}" in d else root / split / d for d in dirs]
    indexes = [
        _stem_index(_need_dir(f, f"{split} {d} folder", cfg)) for f, d in zip(folders, dirs, strict=True)
    ]
    stems = sorted(indexes[0], key=_natural_key)
    if not stems:
        raise DatasetNotFoundError(folders[0] / "*", f"{split} images", cfg)
    keys = {"segmentation": ("image", "mask"), "change": ("A", "B", "label"), "superres": ("lr", "hr")}
    refs = []
    for stem in stems:
        files: dict[str, Path | tuple[Path, ...]] = {}
        for key, folder, index in zip(keys[cfg.head], folders, indexes, strict=True):
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
    key = {"segmentation": "mask", "change": "label", "superres": "hr"}.get(cfg.head, "image")
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
                out.append(SampleRef(f"{ref.id}@{r}_{c}", ref.files, ref.label, (c, r, tile, tile)))
    return out


# ------------------------------------------------------------------------------------------------ reading


def _read_array(path: Path | tuple[Path, ...], cfg: TaskCfg) -> np.ndarray:
    """[C, H, W] float32 in [0, 1] (after ``cfg.stretch``): one multi-band file or one file per band."""
    arr = _read_bands(path, cfg)
    return arr if cfg.stretch is None else Stretch(*cfg.stretch).apply(arr)


def _read_bands(path: Path | tuple[Path, ...], cfg: TaskCfg) -> np.ndarray:
    """[C, H, W] float32 in [0, 1]: one multi-band file (``cfg.bands``) or one file per band (resampled)."""
    if isinstance(path, tuple):
        layers = []
        for p in path:
            if not p.is_file():
                raise DatasetNotFoundError(p, "band file", cfg)
            band = read_image(p, value_range=cfg.value_range, expected_bands=1, min_size=1).array[0]
            if (
                layers and band.shape != layers[0].shape
            ):  # Sentinel-2 20/60 m bands: bilinear to the first's grid
                band = _resize(torch.from_numpy(band)[None], layers[0].shape, "bilinear")[0].numpy()
            layers.append(band)
        return np.stack(layers)
    if not path.is_file():
        raise DatasetNotFoundError(path, "image file", cfg)
    return read_image(path, bands=cfg.bands, value_range=cfg.value_range, min_size=1).array


def _read_raw(path: Path, cfg: TaskCfg) -> np.ndarray:
    """[H, W] integer label map (first band) as stored: class codes, 0/255 change masks."""
    if not path.is_file():
        raise DatasetNotFoundError(path, "label file", cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                arr = src.read(1)
    except RasterioIOError as e:
        raise RasterReadError(path, f"cannot read the label map ({e})") from e
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise RasterReadError(path, f"label map holds non-integer values (dtype {arr.dtype})")
        arr = arr.astype(np.int64)
    return arr.astype(np.int64)


def _crop(arr: np.ndarray, window: tuple[int, int, int, int] | None, factor: int = 1) -> np.ndarray:
    if window is None:
        return arr
    c, r, w, h = (v // factor for v in window)
    return arr[..., r : r + h, c : c + w]


def _resize(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    """``[C, H, W]`` -> ``[C, *size]`` (antialiased when shrinking)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(x[None].float(), size=size, mode=mode, align_corners=False, antialias=shrink)
    return out[0]


def label_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of ``n`` samples (at least one)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(n)
    k = max(1, round(n * fraction))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class TaskDataset(Dataset):
    """One split of a downstream task as sample dicts (module docstring).

    Args:
        cfg: the task section.
        split: ``train``, ``val`` or ``test``.
        mean, std: the backbone's normalisation (one value per channel read).
        train: random horizontal flips when ``augment`` is also true.
        indices: keep only these positions of the split (label-fraction subsets).
        cache: keep decoded arrays in memory (small datasets).
    """

    def __init__(
        self,
        cfg: TaskCfg,
        split: str,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        augment: bool = True,
        indices: Sequence[int] | None = None,
        cache: bool = False,
    ) -> None:
        self.cfg, self.split = cfg, split
        index = list_task(cfg, split)
        refs = index.refs
        if indices is not None:
            refs = [refs[i] for i in indices]
        if not refs:
            raise DataValidationError(f"task {cfg.name!r}: the {split} split of {cfg.root} is empty")
        self.refs = refs
        self.classes = index.classes
        self.meta = index.meta
        self.mean = torch.tensor([float(v) for v in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(-1, 1, 1)
        self.flip = train and augment
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None
        if cfg.head == "multilabel":
            self._class_index = {c: i for i, c in enumerate(self.classes)}
            self._ben43 = {c: i for i, c in enumerate(BEN43)}

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def num_outputs(self) -> int:
        """Classes (classification/multilabel/segmentation), 2 (change) or output bands (superres)."""
        cfg = self.cfg
        if cfg.head in ("classification", "multilabel"):
            return len(self.classes)
        if cfg.head == "segmentation":
            return len(cfg.mask_values) if cfg.mask_values is not None else int(cfg.num_classes or 0)
        if cfg.head == "change":
            return 2
        return self.channels

    @property
    def channels(self) -> int:
        """Bands of the image (read from the first sample)."""
        image = self._raw(0)["image"]
        return int(image.shape[-3])

    # -- raw decoding (cacheable): arrays in [0, 1] and labels before resize/normalise/flip
    def _raw(self, i: int) -> dict[str, Any]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        ref, cfg = self.refs[i], self.cfg
        head = cfg.head
        out: dict[str, Any]
        if head == "classification":
            out = {"image": _crop(_read_array(ref.files["image"], cfg), ref.window), "label": ref.label}
        elif head == "multilabel":
            out = {
                "image": _crop(_read_array(ref.files["image"], cfg), ref.window),
                "label": self._multi_hot(ref),
            }
        elif head == "segmentation":
            image = _crop(_read_array(ref.files["image"], cfg), ref.window)
            mask = _crop(self._seg_mask(ref.files["mask"]), ref.window)
            if image.shape[-2:] != mask.shape:
                raise DataValidationError(
                    f"{ref.files['image']} is {image.shape[-1]}x{image.shape[-2]} px but its mask "
                    f"{ref.files['mask']} is {mask.shape[1]}x{mask.shape[0]} px"
                )
            out = {"image": image, "mask": mask}
        elif head == "change":
            out = self._change(ref)
        else:
            out = self._superres(ref)
        if self._cache is not None:
            self._cache[i] = out
        return out

    def _multi_hot(self, ref: SampleRef) -> np.ndarray:
        path = ref.files["labels"]
        assert isinstance(path, Path)
        if not path.is_file():
            raise DatasetNotFoundError(path, "label metadata json", self.cfg)
        try:
            names = json.loads(path.read_text())["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataValidationError(f"{path}: no 'labels' list ({e})") from e
        target = np.zeros(len(self.classes), np.float32)
        for name in names:
            if self.meta.get("ben19"):
                if name not in self._ben43:
                    raise DataValidationError(
                        f"{path}: label {name!r} is not one of BigEarthNet's 43 classes"
                    )
                j = BEN43_TO_19.get(self._ben43[name])
                if j is not None:
                    target[j] = 1
            elif name in self._class_index:
                target[self._class_index[name]] = 1
            else:
                raise DataValidationError(
                    f"{path}: label {name!r} is not in the task's classes {list(self.classes)} "
                    f"(set finetune.tasks[{self.cfg.name}].classes)"
                )
        return target

    def _seg_mask(self, path: Any) -> np.ndarray:
        cfg = self.cfg
        raw = _read_raw(path, cfg)
        if cfg.mask_values is not None:
            mask = np.full(raw.shape, cfg.ignore_index, np.int64)
            for k, v in enumerate(cfg.mask_values):
                mask[raw == v] = k
            return mask
        k = int(cfg.num_classes or 0)
        bad = (raw >= k) & (raw != cfg.ignore_index) | (raw < 0)
        if bad.any():
            raise DataValidationError(
                f"{path}: mask values {sorted(np.unique(raw[bad]).tolist())[:8]} are outside 0..{k - 1} "
                f"and not "
                f"ignore_index {cfg.ignore_index} (set finetune.tasks[{cfg.name}].mask_values)"
            )
        return raw

    def _change(self, ref: SampleRef) -> dict[str, Any]:
        a_path, b_path = ref.files["A"], ref.files["B"]
        a = _read_array(a_path, self.cfg)
        b = _read_array(b_path, self.cfg)
        if a.shape != b.shape:
            raise DataValidationError(
                f"change pair {ref.id!r} does not match: {_name(a_path)} is {_shape(a)} "
                f"but {_name(b_path)} is "
                f"{_shape(b)}; both dates need the same bands and size"
            )
        label_path = ref.files["label"]
        assert isinstance(label_path, Path)
        label = (_read_raw(label_path, self.cfg) > 0).astype(np.int64)
        if label.shape != a.shape[-2:]:
            raise DataValidationError(
                f"change pair {ref.id!r}: label {label_path} is {label.shape[1]}x{label.shape[0]} px "
                f"but the images "
                f"are {a.shape[-1]}x{a.shape[-2]} px"
            )
        w = ref.window
        return {"image": np.stack([_crop(a, w), _crop(b, w)]), "mask": _crop(label, w)}

    def _superres(self, ref: SampleRef) -> dict[str, Any]:
        lr = _read_array(ref.files["lr"], self.cfg)
        hr = _read_array(ref.files["hr"], self.cfg)
        s = self.cfg.scale
        if hr.shape[0] != lr.shape[0] or hr.shape[1] != lr.shape[1] * s or hr.shape[2] != lr.shape[2] * s:
            raise DataValidationError(
                f"superres pair {ref.id!r}: HR {_name(ref.files['hr'])} is {_shape(hr)} but LR "
                f"{_name(ref.files['lr'])} is {_shape(lr)}; expected the same bands and HR = {s} x LR "
                f"(finetune.tasks[{self.cfg.name}].scale)"
            )
        w = ref.window
        return {"image": _crop(lr, w, s), "target": _crop(hr, w)}

    # -- the sample: resize to img_size, normalise, flip
    def _normalise(self, x: Tensor) -> Tensor:
        if x.shape[-3] != self.mean.shape[0]:
            raise ConfigError(
                f"task {self.cfg.name!r}: images have {x.shape[-3]} bands but the backbone's mean/std has "
                f"{self.mean.shape[0]} values; select bands with finetune.tasks[{self.cfg.name}].bands "
                f"(e.g. [3, 2, 1] for Landsat RGB) or .band_files"
            )
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw, cfg = self._raw(i), self.cfg
        size = (cfg.img_size, cfg.img_size)
        mode = "bicubic" if cfg.head == "superres" else "bilinear"
        image = torch.from_numpy(np.ascontiguousarray(raw["image"]))
        if cfg.head == "change":
            image = torch.stack([self._normalise(_resize(t, size, mode)) for t in image])
        else:
            image = self._normalise(_resize(image, size, mode))
        sample: dict[str, Any] = {"image": image.float()}
        if cfg.head == "classification":
            sample["label"] = torch.tensor(int(raw["label"]), dtype=torch.long)
        elif cfg.head == "multilabel":
            sample["label"] = torch.from_numpy(raw["label"])
        elif cfg.head in ("segmentation", "change"):
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(raw["mask"])).long()
        else:
            sample["target"] = torch.from_numpy(np.ascontiguousarray(raw["target"])).float()
        if self.flip and bool(torch.rand(()) < 0.5):
            for key in ("image", "mask", "target"):
                if key in sample:
                    sample[key] = sample[key].flip(-1)
        sample["index"] = torch.tensor(i, dtype=torch.long)
        sample["id"] = self.refs[i].id
        return sample


def _name(path: Any) -> str:
    if isinstance(path, tuple):
        return f"{path[0].parent}/{{{','.join(p.name for p in path)}}}"
    return str(path)


def _shape(a: np.ndarray) -> str:
    return f"{a.shape[0]} bands x {a.shape[2]}x{a.shape[1]} px"
