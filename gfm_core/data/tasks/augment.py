"""Random augmentation of training samples: the paper's flips and RandomResizedCrop.

GFM's fine-tuning transforms (``data/ucmerced.py`` and ``data/ben_data.py`` ``build_transform``) resize to the
input size, then ``RandomResizedCrop(img_size, scale=(0.67, 1), ratio=(3/4, 4/3))`` (bilinear), then random
horizontal and vertical flips. :class:`SampleAugment` does the same on a sample dict already resized to
``img_size``: the crop only for the image-level heads (:data:`CROP_HEADS`; a dense label would have to be
cropped with it), the flips for every head, applied to the image and its dense label alike (``mask``,
``target``; change pairs ``[2, C, H, W]`` flip both dates) so they stay aligned. GFM crops only when Mixup or
CutMix is on; here ``finetune.crop_scale`` is its own switch. Randomness comes from torch's global generator
(seeded per run and per DataLoader worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

#: Heads whose training images may be cropped (their labels do not depend on where a pixel is).
CROP_HEADS: tuple[str, ...] = ("classification", "multilabel")

#: Aspect-ratio range of the crop (torchvision's default, GFM's value).
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)

#: Sample keys that are images on the input's pixel grid or dense labels (flipped with the image).
SPATIAL_KEYS: tuple[str, ...] = ("image", "mask", "target")


@dataclass(frozen=True)
class SampleAugment:
    """Random RandomResizedCrop (``crop_scale``), horizontal and vertical flips of one sample dict.

    Attributes:
        hflip: flip left-right with probability 0.5.
        vflip: flip top-bottom with probability 0.5.
        crop_scale: area range of ``RandomResizedCrop`` (resized back to the image's size); ``None`` = no crop.
    """

    hflip: bool = False
    vflip: bool = False
    crop_scale: tuple[float, float] | None = None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``sample`` with its image (and dense label) augmented; shapes are kept."""
        out = dict(sample)
        if self.crop_scale is not None:
            out["image"] = random_resized_crop(out["image"], self.crop_scale)
        if self.hflip and bool(torch.rand(()) < 0.5):
            out.update({k: TF.horizontal_flip(out[k]) for k in SPATIAL_KEYS if k in out})
        if self.vflip and bool(torch.rand(()) < 0.5):
            out.update({k: TF.vertical_flip(out[k]) for k in SPATIAL_KEYS if k in out})
        return out


def random_resized_crop(image: torch.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """A random crop of ``scale`` of the area and ``ratio`` aspect, resized (bilinear) back to ``image``'s size."""
    top, left, height, width = RandomResizedCrop.get_params(image, list(scale), list(ratio))
    return TF.resized_crop(image, top, left, height, width, size=list(image.shape[-2:]),
                           interpolation=InterpolationMode.BILINEAR, antialias=True)
