"""A per-band linear contrast stretch of a [0, 1]-scaled image, found per source by :mod:`~gfm_core.data.ingest.stats`.

The same stretch is applied when the training shards are written and when a downstream task reads the same source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gfm_core.errors import DataValidationError


@dataclass(frozen=True)
class Stretch:
    """A per-band linear contrast stretch: ``(x - lo) / (hi - lo)``, clipped to [0, 1].

    Attributes:
        lo, hi: per-band values (of the [0, 1]-scaled image) mapped to 0 and 1.
        percentiles: the percentiles they are (the rule, for the record).
        images: images sampled to find them.
    """

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    percentiles: tuple[float, float] = (2.0, 98.0)
    images: int = 0

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``[C, H, W]`` float in [0, 1] -> stretched float32 ``[C, H, W]`` in [0, 1].

        Raises:
            DataValidationError: the image's band count differs from the stretch's.
        """
        if array.shape[0] != len(self.lo):
            raise DataValidationError(
                f"a {len(self.lo)}-band contrast stretch cannot apply to a {array.shape[0]}-band image "
                f"(the task's bands must match the pile source's)"
            )
        lo = np.asarray(self.lo, np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.hi, np.float32)[:, None, None] - lo, 1e-6)
        return np.clip((array - lo) / span, 0.0, 1.0).astype(np.float32, copy=False)
