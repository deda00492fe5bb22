"""Downstream task datasets: one split of a task as sample dicts for a DataLoader.

A sample is a dict: ``image`` ``[C, S, S]`` float32 (``S = img_size``; change pairs ``[2, C, S, S]``)
scaled to [0, 1] with ``value_range`` (DN 0..255 -> [0, 1] like the pretraining pile) and normalised with the
backbone's mean/std; then ``label`` (int64 class), ``label`` (float32 multi-hot ``[L]``), ``mask`` (int64
``[H, W]`` at the label's native size; change: 1 = change) or ``target`` (float32 ``[C, H, W]`` HR image in
[0, 1]); plus
``index`` (position in the split) and ``id`` (a stable sample name that pairs results across models).

The files come from the task's layout (:func:`~gfm_core.data.tasks.layouts.list_task`); each head's samples are
read by its reader (:mod:`gfm_core.data.tasks.samples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gfm_core.config import TaskCfg
from gfm_core.data.tasks.augment import CROP_HEADS, SampleAugment
from gfm_core.data.tasks.layouts import list_task
from gfm_core.data.tasks.samples import SAMPLE_READERS
from gfm_core.errors import ConfigError, DataValidationError


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
        train: augment the samples (:class:`~gfm_core.data.tasks.augment.SampleAugment`) when ``augment`` is
            also true: random horizontal flips, plus vertical flips (``vflip``) and, for the classification
            and multilabel heads, RandomResizedCrop of ``crop_scale`` of the area (``None`` = no crop).
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
        vflip: bool = False,
        crop_scale: tuple[float, float] | None = None,
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
        on = train and augment
        self.augment = SampleAugment(hflip=on, vflip=on and vflip,
                                     crop_scale=crop_scale if on and cfg.head in CROP_HEADS else None)
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None
        self.reader = SAMPLE_READERS.get(cfg.head)(self)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def num_outputs(self) -> int:
        """Classes (classification/multilabel/segmentation), 2 (change) or output bands (superres)."""
        return self.reader.num_outputs()

    @property
    def channels(self) -> int:
        """Bands of the image (read from the first sample)."""
        image = self._raw(0)["image"]
        return int(image.shape[-3])

    # -- raw decoding (cacheable): arrays in [0, 1] and labels before resize/normalise/flip
    def _raw(self, i: int) -> dict[str, Any]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        out = self.reader.raw(self.refs[i])
        if self._cache is not None:
            self._cache[i] = out
        return out

    # -- the sample: resize to img_size, normalise, augment
    def normalise(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` with the backbone's normalisation.

        Raises:
            ConfigError: the image has another number of bands than the normalisation.
        """
        if x.shape[-3] != self.mean.shape[0]:
            raise ConfigError(
                f"task {self.cfg.name!r}: images have {x.shape[-3]} bands but the backbone's mean/std has "
                f"{self.mean.shape[0]} values; select bands with finetune.tasks[{self.cfg.name}].bands "
                f"(e.g. [3, 2, 1] for Landsat RGB), .band_names ([red, green, blue]) or .band_files"
            )
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw, cfg = self._raw(i), self.cfg
        image = torch.from_numpy(np.ascontiguousarray(raw["image"]))
        sample: dict[str, Any] = {"image": self.reader.image(image, (cfg.img_size, cfg.img_size)).float(),
                                  **self.reader.label(raw)}
        sample = self.augment(sample)
        sample["index"] = torch.tensor(i, dtype=torch.long)
        sample["id"] = self.refs[i].id
        return sample
