"""Pretraining samples: crops drawn on the fly from the pile's shards, a SimMIM mask each.

Each sample is ``{"image": [C, S, S] float32 normalised, "mask": [h, w] bool, 1 = masked}`` (plus
``"teacher_target": [D]`` when the stream reads a :class:`~gfm_core.data.pretrain.teacher_pool.TeacherPool`). Its
randomness (image, crop, flip, mask) depends only on ``(seed, epoch, index)``, so a resumed run, any number of
loader workers or ranks draw exactly the samples an uninterrupted run would, and two pretraining variants with
the same seed see the same crops and masks (common random numbers).

A view is GFM's: a RandomResizedCrop of one pile image (area fraction ``crop_scale``, aspect ``crop_ratio``,
uniform position) with a horizontal flip, resized to ``img_size`` and normalised. Which image:

- ``samples_per_epoch=None`` (the paper): every training image once per epoch, in the loader's order;
- ``samples_per_epoch=N``: ``N`` independent draws per epoch; a draw picks a source with probability
  ``source_weights[source]`` (default: its share of the pile's pixels) and one of its images with probability
  proportional to its area, so every pixel of a source is equally likely.

Held out: :func:`holdout_images` sets aside a fixed share of each source's images; training never draws them,
and fixed crops of them (:meth:`PretrainStream.holdout_samples`) measure what the student learns.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from gfm_core.data.pretrain.masking import MaskGenerator
from gfm_core.data.pretrain.shard_dataset import ShardDataset
from gfm_core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOLDOUT_SEED = 0x401D  # held-out crops and masks are the same for every pretraining seed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` in ``epoch`` (a hash: nearby indexes draw unrelated crops)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


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
        """A new normalised float32 tensor (``x`` is never modified).

        Raises:
            TypeError: ``x`` is neither uint8 nor float32.
        """
        scale = self._scale.get(x.dtype)
        if scale is None:
            raise TypeError(f"expected a uint8 or float32 image, got {x.dtype}")
        y = x.to(torch.float32, memory_format=torch.contiguous_format)
        if y.data_ptr() == x.data_ptr():  # float32 input already contiguous: never modify the caller's tensor
            y = y.clone()
        return y.mul_(scale).add_(self._shift)

    def __repr__(self) -> str:
        return f"NormaliseToFloat(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


@dataclass(frozen=True)
class Crop:
    """One view of one pile image: the crop box (pixels of the stored image) and the flip."""

    image: int  # global index in the shards (sorted by path)
    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_row(self) -> list[int]:
        """``[image, top, left, height, width, flip]`` (a pool's int64 row)."""
        return [self.image, self.top, self.left, self.height, self.width, int(self.flip)]


def random_resized_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, h, w)``, drawn from ``rng``: 10 tries, then centre."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropSampler:
    """Draws :class:`Crop` views: an image (weighted by source and area), a RandomResizedCrop box, a flip.

    Args:
        shapes: ``[N, 2]`` stored (height, width) of every pile image.
        sources: the source of every pile image.
        candidates: global indexes the sampler may draw (training images, or held-out ones).
        crop_scale, crop_ratio: RandomResizedCrop's area and aspect ranges.
        source_weights: source -> share of draws; None = each source's share of the candidates' pixels. A
            source missing from the mapping is never drawn; a weight of 0 may name a source the pile lacks.

    Raises:
        ConfigError: a positive weight names no source of the pile, or no candidate has a positive weight.
    """

    def __init__(
        self,
        shapes: np.ndarray,
        sources: Sequence[str],
        candidates: np.ndarray,
        *,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        source_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.shapes, self.scale, self.ratio = shapes, crop_scale, crop_ratio
        self.candidates = np.asarray(candidates, dtype=np.int64)
        area = shapes[self.candidates, 0].astype(np.float64) * shapes[self.candidates, 1]
        names = [sources[i] for i in self.candidates]
        if source_weights is None:
            p = area
        else:
            unknown = sorted(k for k, w in source_weights.items() if k not in set(sources) and w > 0)
            if unknown:
                raise ConfigError(
                    f"pretrain.source_weights: unknown source(s) {unknown}; the pile has {sorted(set(sources))}"
                )
            totals: dict[str, float] = {}
            for n, a in zip(names, area, strict=True):
                totals[n] = totals.get(n, 0.0) + a
            p = np.array([source_weights.get(n, 0.0) * a / totals[n] for n, a in zip(names, area, strict=True)])
        if not len(p) or p.sum() <= 0:
            raise ConfigError("pretrain.source_weights: no image of the pile can be drawn (all weights are 0)")
        self.cdf = np.cumsum(p / p.sum())

    def image(self, rng: np.random.Generator) -> int:
        """A global image index, weighted as the class docstring says."""
        k = int(np.searchsorted(self.cdf, rng.random(), side="right"))
        return int(self.candidates[min(k, len(self.candidates) - 1)])

    def crop(self, rng: np.random.Generator, image: int) -> Crop:
        """A RandomResizedCrop box of ``image`` and a flip."""
        h, w = (int(v) for v in self.shapes[image])
        top, left, ch, cw = random_resized_crop(rng, h, w, self.scale, self.ratio)
        return Crop(image, top, left, ch, cw, bool(rng.random() < 0.5))

    def draw(self, rng: np.random.Generator) -> Crop:
        """:meth:`crop` of an :meth:`image`."""
        return self.crop(rng, self.image(rng))


def holdout_images(sources: Sequence[str], sha256: Sequence[str], fraction: float) -> np.ndarray:
    """The held-out global indexes: per source, the ``ceil(fraction * n)`` images with the smallest hash.

    At most ``n - 1`` of a source's ``n`` images (one image is never held out), so no source leaves training.
    The choice depends only on the images' content, not on their order or the pile's other sources.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"pretrain.holdout_fraction must lie in [0, 1), got {fraction}")
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    out: list[int] = []
    for idx in by_source.values():
        k = min(math.ceil(fraction * len(idx)), len(idx) - 1)
        out.extend(sorted(idx, key=lambda i: hashlib.blake2b(sha256[i].encode(), digest_size=8).digest())[:k])
    return np.array(sorted(out), dtype=np.int64)


class PretrainStream:
    """The training stream over a shard folder (a map-style dataset; see the module docstring).

    Args:
        shard_dir: folder written by :func:`~gfm_core.data.ingest.shards.write_shards`.
        img_size: output edge in pixels (paper 192).
        mask: the mask generator (its input size must equal ``img_size``).
        crop_scale, crop_ratio: RandomResizedCrop ranges (paper (0.67, 1), (3/4, 4/3)).
        mean, std: per-channel normalisation of the [0, 1]-scaled image (paper: ImageNet's).
        seed: base seed of the sample randomness.
        samples_per_epoch: None = each training image once per epoch; else draws per epoch.
        source_weights: see :class:`CropSampler` (only with ``samples_per_epoch``).
        holdout_fraction: share of each source's images held out of training (:func:`holdout_images`).
        pool: read views and teacher targets from this fixed pool instead of drawing new views.

    Raises:
        ConfigError: the mask size differs from ``img_size``, mean/std lengths differ, weights without
            ``samples_per_epoch``, or a bad weight.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        img_size: int,
        mask: MaskGenerator,
        *,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        source_weights: Mapping[str, float] | None = None,
        holdout_fraction: float = 0.0,
        pool: Any = None,
    ) -> None:
        if mask.input_size != (img_size, img_size):
            raise ConfigError(f"mask generator input size {mask.input_size} != img_size {img_size}")
        if len(mean) != len(std):
            raise ConfigError(f"normalisation mean has {len(mean)} channels but std has {len(std)}")
        if source_weights is not None and samples_per_epoch is None:
            raise ConfigError("pretrain.source_weights needs pretrain.samples_per_epoch (weighted draws)")
        self.data = ShardDataset(shard_dir)
        self.img_size, self.mask, self.seed, self.epoch = img_size, mask, seed, 0
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels = len(mean)
        self.normalise = NormaliseToFloat(mean, std)
        self.samples_per_epoch, self.pool = samples_per_epoch, pool
        index = self.data.index
        self.content_hash: str = self.data.content_hash
        shapes, sources, shas = _catalogue(self.data)
        self.sources = sources
        self.held_out = holdout_images(sources, shas, holdout_fraction)
        train = np.setdiff1d(np.arange(len(sources)), self.held_out)
        kw = dict(crop_scale=tuple(crop_scale), crop_ratio=tuple(crop_ratio),
                  source_weights=dict(source_weights) if source_weights is not None else None)
        self.sampler = CropSampler(shapes, sources, train, **kw)  # type: ignore[arg-type]
        self.sampler_settings = kw
        self._shapes = shapes
        self.train_images = train
        self.generation = index["shards"][0]["file"].split("/")[0] if index["shards"] else ""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` makes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.train_images)

    def render(self, crop: Crop) -> torch.Tensor:
        """The normalised float32 ``[C, S, S]`` view ``crop`` of the stored uint8 image."""
        return self.normalise(self.view(crop))

    def view(self, crop: Crop) -> torch.Tensor:
        """The uint8 ``[C, S, S]`` view ``crop`` (resized crop, flipped) of the stored image."""
        x = self.data.shards.view(crop.image)
        if x.shape[0] != self.channels:
            if x.shape[0] == 1:
                x = x.expand(self.channels, -1, -1)
            else:
                raise ConfigError(
                    f"{self.data.shards.paths[crop.image]}: {x.shape[0]} band(s) read but the model takes "
                    f"{self.channels}; set `bands` for source {self.sources[crop.image]!r}"
                )
        x = TF.resized_crop(x, crop.top, crop.left, crop.height, crop.width, [self.img_size] * 2, antialias=True)
        if crop.flip:
            x = TF.horizontal_flip(x)
        return x

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.samples_per_epoch is None:
            image = int(self.train_images[index])
            s = sample_seed(self.seed, self.epoch, image)
        else:
            s = sample_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng(s)
        out: dict[str, torch.Tensor] = {}
        if self.pool is not None:  # a stored view and its target; only the mask is new
            j = int(rng.integers(len(self.pool)))
            out["image"] = self.normalise(self.pool.views[j])
            out["teacher_target"] = self.pool.targets[j]
        else:
            crop = self.sampler.crop(rng, image) if self.samples_per_epoch is None else self.sampler.draw(rng)
            out["image"] = self.render(crop)
        out["mask"] = self.mask(torch.Generator().manual_seed(s ^ 0x5EED))
        return out

    def holdout_samples(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` fixed views of held-out images with fixed masks: ``{"image": [n, C, S, S], "mask": [n, h, w]}``.

        The same for every training seed (drawn from :data:`HOLDOUT_SEED`, weighted like training draws).

        Raises:
            ConfigError: no image is held out (``holdout_fraction`` 0).
        """
        if not len(self.held_out):
            raise ConfigError("no held-out images: set pretrain.holdout_fraction > 0 to measure learning")
        sampler = CropSampler(self._shapes, self.sources, self.held_out, **self.sampler_settings)  # type: ignore[arg-type]
        rng = np.random.default_rng(HOLDOUT_SEED)
        crops = [sampler.draw(rng) for _ in range(n)]
        masks = [self.mask(torch.Generator().manual_seed(HOLDOUT_SEED + k)) for k in range(n)]
        return {"image": torch.stack([self.render(c) for c in crops]), "mask": torch.stack(masks)}


def _catalogue(data: ShardDataset) -> tuple[np.ndarray, list[str], list[str]]:
    """``([N, 2] stored height/width, sources, sha256s)`` of every shard image (global order)."""
    shards = data.shards
    return shards.shape[:, :2].copy(), list(shards.sources), list(shards.sha256)
