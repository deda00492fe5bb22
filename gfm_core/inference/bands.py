"""The band contract of a backbone: which bands, in which order, scaled and normalised how; checked per scene.

A backbone's JSON sidecar (and its model card, :func:`gfm_core.tracking.model_card`) says: ``in_chans`` bands
(the pile is RGB: red, green, blue in that order), pixels scaled to ``[0, 1]`` by the file dtype's value range
(:data:`gfm_core.data.raster.header.DEFAULT_VALUE_RANGES`: uint8 / 255, uint16 / 10000, floats as they are),
then ``(x - mean) / std`` per band. A scene's bands are chosen by index (``bands=(3, 2, 1)``), by name against
the file's band descriptions (``band_names=("red", "green", "blue")``, Sentinel-2 codes accepted), or, with
neither, by the contract's names when the file describes its bands, else in file order when the count matches.
Anything else fails naming the expected and the found bands: nothing is zero-filled or dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.data.raster.header import DEFAULT_VALUE_RANGES
from gfm_core.data.raster.stretch import Stretch
from gfm_core.data.tasks.band_names import resolve_band_names
from gfm_core.errors import ConfigError, DataValidationError

#: The band names of a 3-band backbone of the pile (RGB order; see :data:`gfm_core.tracking.card.LIMITATIONS`).
RGB = ("red", "green", "blue")


@dataclass(frozen=True)
class BandContract:
    """What a backbone expects of its input.

    Attributes:
        names: one name per input channel, in order.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
        input_size: ``(C, H, W)`` the backbone was trained at (H is the default tile).
        stretch: per-band ``(lo, hi)`` contrast stretch of ``[0, 1]`` pixels applied before the normalisation
            (a fine-tuned task's ``stretch``, :class:`gfm_core.data.raster.stretch.Stretch`); None = none.
    """

    names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    stretch: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def count(self) -> int:
        """Input channels."""
        return len(self.names)

    def describe(self) -> str:
        """``"3: red, green, blue"``."""
        return f"{self.count}: {', '.join(self.names)}"

    def normalise(self, x01: np.ndarray) -> np.ndarray:
        """``[C, H, W]`` in ``[0, 1]`` -> (stretched, then) ``(x - mean) / std`` (float32)."""
        if self.stretch is not None:
            x01 = Stretch(*self.stretch).apply(x01)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return ((x01 - mean) / std).astype(np.float32, copy=False)


def contract_from_sidecar(side: Mapping[str, Any], source: str = "sidecar") -> BandContract:
    """The contract of an exported backbone from its JSON sidecar (``pretrained_cfg``, ``timm_kwargs``).

    ``bands`` in the sidecar, when present, names the channels; otherwise a 3-channel backbone is RGB and other
    counts are ``band1..bandN`` (checked by count only).

    Raises:
        ConfigError: mean/std missing or not one value per channel.
    """
    pcfg = dict(side.get("pretrained_cfg") or {})
    size = pcfg.get("input_size") or [side.get("timm_kwargs", {}).get("in_chans", 3), 224, 224]
    c = int(size[0])
    names = tuple(side.get("bands") or (RGB if c == 3 else tuple(f"band{i}" for i in range(1, c + 1))))
    mean, std = pcfg.get("mean"), pcfg.get("std")
    if mean is None or std is None or len(mean) != c or len(std) != c or len(names) != c:
        raise ConfigError(
            f"{source}: pretrained_cfg needs mean and std with one value per input channel ({c}), got "
            f"mean={mean}, std={std}, bands={list(names)}"
        )
    return BandContract(names, tuple(float(v) for v in mean), tuple(float(v) for v in std),
                        (c, int(size[1]), int(size[2])))


def _found(count: int, descriptions: Sequence[str | None]) -> str:
    return f"{count}: {', '.join(d or f'band{i} (no name)' for i, d in enumerate(descriptions, 1))}"


def select_bands(
    path: Path,
    contract: BandContract,
    count: int,
    descriptions: Sequence[str | None],
    *,
    bands: Sequence[int] | None = None,
    band_names: Sequence[str] | None = None,
) -> tuple[int, ...]:
    """The 1-based band indexes of ``path`` that feed the contract's channels, in order (module docstring).

    Raises:
        ConfigError: both ``bands`` and ``band_names``, or an index outside the file.
        DataValidationError: the selection does not give the contract's band count, or the file's bands
            cannot be matched to it (the message names the expected and the found bands, and the fix).
    """
    expected, found = contract.describe(), _found(count, descriptions)
    if bands is not None and band_names is not None:
        raise ConfigError("give bands (indexes) or band_names, not both")
    if bands is not None:
        chosen = tuple(int(b) for b in bands)
        bad = [b for b in chosen if not 1 <= b <= count]
        if bad:
            raise ConfigError(f"{path}: band index(es) {bad} outside the file's bands ({found})")
    elif band_names is not None:
        chosen = resolve_band_names(path, list(band_names), list(descriptions))
    elif any(descriptions) and _names_resolve(path, contract, descriptions):
        chosen = resolve_band_names(path, list(contract.names), list(descriptions))
    elif count == contract.count:
        chosen = tuple(range(1, count + 1))
    else:
        raise DataValidationError(
            f"{path}: the model expects bands ({expected}), the file has ({found}); select {contract.count} "
            f"bands in the model's order with bands (e.g. --bands 3,2,1) or band_names "
            f"(e.g. --band-names {','.join(contract.names)})"
        )
    if len(chosen) != contract.count:
        raise DataValidationError(
            f"{path}: {len(chosen)} band(s) selected {list(chosen)}, the model expects ({expected}); the file "
            f"has ({found})"
        )
    return chosen


def _names_resolve(path: Path, contract: BandContract, descriptions: Sequence[str | None]) -> bool:
    try:
        resolve_band_names(path, list(contract.names), list(descriptions))
    except DataValidationError:
        return False
    return True


def value_range_for(dtype: str, value_range: Sequence[float] | None = None) -> tuple[float, float]:
    """``value_range`` (checked), or the reader's default for ``dtype``.

    Raises:
        ConfigError: a malformed range, or a dtype without a default (the supported dtypes are listed).
    """
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ConfigError(f"value_range must be two finite numbers with lo < hi, got {list(value_range)}")
        return lo, hi
    if dtype not in DEFAULT_VALUE_RANGES:
        raise ConfigError(
            f"no default value_range for dtype {dtype} (supported: {', '.join(DEFAULT_VALUE_RANGES)}); "
            f"give value_range"
        )
    return DEFAULT_VALUE_RANGES[dtype]
