"""Change detection over whole scenes: two co-registered dates read as one scene, fed to a siamese model.

:class:`PairScene` opens the *before* and *after* scenes with the same band choice, checks that they share
size, CRS and transform (no resampling happens here), and reads a window of both: ``x01`` stacks the before
bands over the after bands (``[2C, h, w]``), and a pixel is valid only where it is valid on both dates.
:func:`pair_contract` doubles the band contract to match, and :class:`PairModel` turns the stacked batch back
into the ``[B, 2, C, H, W]`` pair a change head takes (torchgeo's layout), so the tiling, blending and writing
of :func:`~gfm_core.inference.predict.predict_scene` apply unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from torch import Tensor, nn

from gfm_core.errors import DataValidationError
from gfm_core.inference.bands import BandContract
from gfm_core.inference.scene import Scene, Window01
from gfm_core.inference.tiles import Tile


class PairScene:
    """Two scenes of the same grid read together (module docstring); attributes as :class:`Scene`'s."""

    def __init__(self, before: str | Path, after: str | Path, contract: BandContract, *,
                 bands: Sequence[int] | None = None, band_names: Sequence[str] | None = None,
                 value_range: Sequence[float] | None = None) -> None:
        kw: dict[str, Any] = {"bands": bands, "band_names": band_names, "value_range": value_range}
        self.before = Scene(before, contract, **kw)
        try:
            self.after = Scene(after, contract, **kw)
        except BaseException:
            self.before.close()
            raise
        a, b = self.before, self.after
        problems = [what for what, same in (
            (f"size {a.height} x {a.width} vs {b.height} x {b.width}", (a.height, a.width) == (b.height, b.width)),
            (f"CRS {a.crs} vs {b.crs}", a.crs == b.crs),
            (f"transform {tuple(a.transform)[:6]} vs {tuple(b.transform)[:6]}", a.transform.almost_equals(b.transform)),
        ) if not same]
        if problems:
            self.close()
            raise DataValidationError(f"{a.path} and {b.path} are not on the same grid ({'; '.join(problems)}); "
                                      f"reproject the after scene onto the before scene's grid first")
        self.path, self.height, self.width = a.path, a.height, a.width
        self.crs, self.transform = a.crs, a.transform

    def __enter__(self) -> PairScene:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close both files (the after scene first: each holds a rasterio environment, which nest)."""
        try:
            self.after.close()
        finally:
            self.before.close()

    def read(self, tile: Tile) -> Window01:
        """``tile``'s window of both dates: ``x01 [2C, h, w]``, valid where both are."""
        a, b = self.before.read(tile), self.after.read(tile)
        return Window01(np.concatenate([a.x01, b.x01]), a.valid & b.valid)


def pair_contract(contract: BandContract) -> BandContract:
    """The contract of the stacked pair: every band twice (``<name>@before``, then ``<name>@after``)."""
    stretch = None if contract.stretch is None else (tuple(contract.stretch[0]) * 2, tuple(contract.stretch[1]) * 2)
    c, h, w = contract.input_size
    return BandContract(tuple(f"{n}@before" for n in contract.names) + tuple(f"{n}@after" for n in contract.names),
                        contract.mean * 2, contract.std * 2, (2 * c, h, w), stretch=stretch)


class PairModel(nn.Module):
    """A siamese model over stacked pairs: ``[B, 2C, H, W]`` -> ``model([B, 2, C, H, W])``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, 2C, H, W]`` (before bands, then after bands) -> the model's output."""
        b, c2, h, w = x.shape
        out: Tensor = self.model(x.view(b, 2, c2 // 2, h, w))
        return out
