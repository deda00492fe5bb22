"""Pretraining samples: GFM's augmentation and a SimMIM mask per image, reproducible per (seed, epoch, index).

Each sample is ``{"image": [C, S, S] float32 normalised, "mask": [h, w] bool, 1 = masked}``. The randomness of
sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``, so a resumed run (or any number of loader workers)
draws exactly the crops and masks an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from gfm_core.data.masking import MaskGenerator
from gfm_core.data.raster import read_image
from gfm_core.data.sources import SourceSpec
from gfm_core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PileItem:
    """One image of the pile and how to read it."""

    path: Path
    source: SourceSpec


def list_pile(data_root: str | Path, sources: Sequence[SourceSpec]) -> list[PileItem]:
    """Every image of ``sources`` under ``data_root``, sorted (the order that sample indexes refer to).

    Raises:
        ConfigError: a source folder is missing or holds no image.
    """
    root = Path(data_root)
    items: list[PileItem] = []
    for spec in sources:
        base = root / spec.root
        if not base.is_dir():
            raise ConfigError(f"{base}: source {spec.name!r} folder not found (check ingest.root and its sources)")
        pats = tuple(p.lower().lstrip("*") for p in spec.patterns)
        found = sorted(p for p in base.rglob("*") if p.is_file() and p.name.lower().endswith(pats))
        if not found:
            raise ConfigError(f"{base}: source {spec.name!r} holds no image matching {list(spec.patterns)}")
        items.extend(PileItem(p, spec) for p in found)
    return items


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` in ``epoch`` (a hash: nearby indexes draw unrelated crops)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


_sample_seed = sample_seed  # the original private name


class NormaliseToFloat:
    """``[C, H, W]`` image -> contiguous float32 ``(x / full_scale - mean) / std`` in one pass.

    The same values as ``v2.ToDtype(torch.float32, scale=True)`` then ``v2.Normalize(mean, std)`` (to float
    rounding), for uint8 input (full scale 255) as for float input in [0, 1] (full scale 1), but 3-4x
    cheaper on a channels-last crop, where Normalize's broadcast runs on a strided layout.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._shift = -self.mean / self.std
        self._scale = {torch.uint8: 1.0 / (255.0 * self.std), torch.float32: 1.0 / self.std}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale.get(x.dtype)
        if scale is None:
            raise TypeError(f"expected a uint8 or float32 image, got {x.dtype}")
        y = x.to(torch.float32, memory_format=torch.contiguous_format)
        if y.data_ptr() == x.data_ptr():  # float32 input already contiguous: never modify the caller's tensor
            y = y.clone()
        return y.mul_(scale).add_(self._shift)

    def __repr__(self) -> str:
        return f"NormaliseToFloat(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class PretrainAugment:
    """GFM's pretraining view of one image, the single implementation behind every pretraining dataset.

    RandomResizedCrop -> horizontal flip -> float in [0, 1] -> normalise, plus a SimMIM mask; every random
    draw comes from one seed. The input may be float ``[C, H, W]`` already in [0, 1] (:class:`PretrainImages`)
    or uint8 (the shard reader: cropping and resizing 8-bit pixels is much cheaper, and a channels-last
    ``[C, H, W]`` view hits torch's vectorised uint8 antialiased resize); the same seed and input size give
    the same crop and flip either way.

    Args:
        img_size: output edge in pixels (paper 192).
        mask: the mask generator (its input size must equal ``img_size``).
        crop_scale: RandomResizedCrop area range (paper (0.67, 1)).
        crop_ratio: RandomResizedCrop aspect range (paper (3/4, 4/3)).
        mean: per-channel normalisation mean of the [0, 1]-scaled image (paper: ImageNet's).
        std: per-channel normalisation std.

    Raises:
        ConfigError: the mask size differs from ``img_size``, or ``mean`` and ``std`` differ in length.
    """

    def __init__(
        self,
        img_size: int,
        mask: MaskGenerator,
        *,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if mask.input_size != (img_size, img_size):
            raise ConfigError(f"mask generator input size {mask.input_size} != img_size {img_size}")
        if len(mean) != len(std):
            raise ConfigError(f"normalisation mean has {len(mean)} channels but std has {len(std)}")
        self.img_size = img_size
        self.mask = mask
        self.channels = len(mean)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(img_size, scale=crop_scale, ratio=crop_ratio, antialias=True),
                v2.RandomHorizontalFlip(),
                NormaliseToFloat(mean, std),  # = ToDtype(float32, scale=True) + Normalize, in one pass
            ]
        )

    def match_channels(self, x: torch.Tensor, path: object, source: str) -> torch.Tensor:
        """``x`` with the model's channel count (one band is repeated), else a ConfigError naming the file."""
        if x.shape[0] == 1 and self.channels > 1:
            x = x.expand(self.channels, -1, -1)
        if x.shape[0] != self.channels:
            raise ConfigError(
                f"{path}: {x.shape[0]} band(s) read but the model takes {self.channels}; "
                f"set `bands` for source {source!r}"
            )
        return x

    def __call__(self, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """One sample from ``x`` (``[C, H, W]``, uint8 or float in [0, 1]).

        Returns:
            ``{"image": [C, S, S] float32 normalised, "mask": [h, w] bool, 1 = masked}``.
        """
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed every CUDA device (outside the fork,
            # so the model's dropout streams) and costs ~100 us a call; the CPU draws are the same
            torch.random.default_generator.manual_seed(seed)
            image = self.transform(x)
        mask = self.mask(torch.Generator().manual_seed(seed ^ 0x5EED))
        return {"image": image.contiguous(), "mask": mask}


class PretrainImages(Dataset):
    """GFM pretraining view of a list of images: RandomResizedCrop -> flip -> normalise, plus a SimMIM mask.

    Args:
        items: the images (:func:`list_pile`).
        img_size: output edge in pixels (paper 192).
        mask: the mask generator (its input size must equal ``img_size``).
        crop_scale: RandomResizedCrop area range (paper (0.67, 1)).
        crop_ratio: RandomResizedCrop aspect range (paper (3/4, 4/3)).
        mean: per-channel normalisation mean of the [0, 1]-scaled image (paper: ImageNet's).
        std: per-channel normalisation std.
        seed: base seed; sample randomness is a function of (seed, epoch, index).
    """

    def __init__(
        self,
        items: Sequence[PileItem],
        img_size: int,
        mask: MaskGenerator,
        *,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        if not items:
            raise ConfigError("the pretraining pile is empty")
        self.augment = PretrainAugment(
            img_size, mask, crop_scale=crop_scale, crop_ratio=crop_ratio, mean=mean, std=std
        )
        self.items = list(items)
        self.mask = mask
        self.channels = self.augment.channels
        self.seed = seed
        self.epoch = 0
        self.transform = self.augment.transform

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` makes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> torch.Tensor:
        """The image scaled to [0, 1] as ``[C, H, W]`` with the dataset's channel count."""
        item = self.items[index]
        img = read_image(item.path, bands=item.source.bands, value_range=item.source.value_range)
        x = torch.from_numpy(np.ascontiguousarray(img.array))
        return self.augment.match_channels(x, item.path, item.source.name)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.augment(self.load(index), sample_seed(self.seed, self.epoch, index))
