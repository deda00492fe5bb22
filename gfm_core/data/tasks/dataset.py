"""Downstream task datasets: one split of a task as sample dicts for a DataLoader.

A sample is a dict: ``image`` ``[C, S, S]`` float32 (``S = img_size``; change pairs ``[2, C, S, S]``)
scaled to [0, 1] with ``value_range`` (DN 0..255 -> [0, 1] like the pretraining pile) and normalised with the
backbone's mean/std; then ``label`` (int64 class), ``label`` (float32 multi-hot ``[L]``), ``mask`` (int64
``[H, W]`` at the label's native size; change: 1 = change) or ``target`` (float32 ``[C, H, W]`` HR image in
[0, 1]); plus
``index`` (position in the split) and ``id`` (a stable sample name that pairs results across models).

The files come from the task's layout (:func:`~gfm_core.data.tasks.layouts.list_task`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
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
from gfm_core.data.tasks.bigearthnet import BEN43, BEN43_TO_19
from gfm_core.data.tasks.index import DatasetNotFoundError, SampleRef
from gfm_core.data.tasks.layouts import list_task
from gfm_core.errors import ConfigError, DataValidationError, RasterReadError


def _read_array(path: Path | tuple[Path, ...], cfg: TaskCfg) -> np.ndarray:
    """[C, H, W] float32 in [0, 1] (after ``cfg.stretch``): one multi-band file or one file per band."""
    arr = _read_bands(path, cfg)
    return arr if cfg.stretch is None else Stretch(*cfg.stretch).apply(arr)


def _read_bands(path: Path | tuple[Path, ...], cfg: TaskCfg) -> np.ndarray:
    """[C, H, W] float32 in [0, 1]: one multi-band file (``cfg.bands``) or one file per band (resampled)."""
    if isinstance(path, tuple):
        layers: list[np.ndarray] = []
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
        indices: Sequence[int] | np.ndarray | None = None,
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
