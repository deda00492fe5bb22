"""Arrays of task samples: images read to [C, H, W] float32 in [0, 1] (bands, value range, stretch), label maps
as stored, and the crop/resize the task datasets apply."""

from __future__ import annotations

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

from gfm_core.config import TaskCfg
from gfm_core.data.raster.reader import read_image
from gfm_core.data.raster.stretch import Stretch
from gfm_core.data.tasks.band_names import band_descriptions, resolve_band_names
from gfm_core.data.tasks.index import DatasetNotFoundError
from gfm_core.errors import RasterReadError


def read_array(path: Path | tuple[Path, ...], cfg: TaskCfg) -> np.ndarray:
    """[C, H, W] float32 in [0, 1] (after ``cfg.stretch``): one multi-band file or one file per band."""
    arr = read_bands(path, cfg)
    return arr if cfg.stretch is None else Stretch(*cfg.stretch).apply(arr)


def read_bands(path: Path | tuple[Path, ...], cfg: TaskCfg) -> np.ndarray:
    """[C, H, W] float32 in [0, 1]: one multi-band file (``bands``/``band_names``) or one file per band (resampled)."""
    if isinstance(path, tuple):
        layers: list[np.ndarray] = []
        for p in path:
            if not p.is_file():
                raise DatasetNotFoundError(p, "band file", cfg)
            band = read_image(p, value_range=cfg.value_range, expected_bands=1, min_size=1).array[0]
            if (
                layers and band.shape != layers[0].shape
            ):  # Sentinel-2 20/60 m bands: bilinear to the first's grid
                band = resize(torch.from_numpy(band)[None], layers[0].shape, "bilinear")[0].numpy()
            layers.append(band)
        return np.stack(layers)
    if not path.is_file():
        raise DatasetNotFoundError(path, "image file", cfg)
    bands = cfg.bands
    if cfg.band_names is not None:
        bands = resolve_band_names(path, cfg.band_names, band_descriptions(path))
    return read_image(path, bands=bands, value_range=cfg.value_range, min_size=1).array


def read_raw(path: Path, cfg: TaskCfg) -> np.ndarray:
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


def crop(arr: np.ndarray, window: tuple[int, int, int, int] | None, factor: int = 1) -> np.ndarray:
    """``arr[..., window]`` (``(col, row, width, height)`` divided by ``factor``); all of it without a window."""
    if window is None:
        return arr
    c, r, w, h = (v // factor for v in window)
    return arr[..., r : r + h, c : c + w]


def resize(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    """``[C, H, W]`` -> ``[C, *size]`` (antialiased when shrinking)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(x[None].float(), size=size, mode=mode, align_corners=False, antialias=shrink)
    return out[0]


def file_name(path: Any) -> str:
    """A file, or a band-file tuple as ``<folder>/{a,b,c}``, for messages."""
    if isinstance(path, tuple):
        return f"{path[0].parent}/{{{','.join(p.name for p in path)}}}"
    return str(path)


def array_shape(a: np.ndarray) -> str:
    """``C bands x WxH px`` of a ``[C, H, W]`` array, for messages."""
    return f"{a.shape[0]} bands x {a.shape[2]}x{a.shape[1]} px"
