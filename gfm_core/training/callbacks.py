"""The callback protocol of :func:`~gfm_core.training.loop.fit`, and callbacks that watch the logged metrics.

Callbacks run on rank 0 only. ``fit`` calls whichever of the :class:`Callback` hooks an object has, so any
object with some of these methods works; subclassing :class:`Callback` is a convenience.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class Callback:
    """Hooks called on rank 0; subclass and override, or pass any object with these methods."""

    def measure(self, step: int) -> dict[str, float]:
        """At each logged step, before ``on_log``: metrics of the current weights to add to the record."""
        return {}

    def on_step_end(self, step: int) -> None:
        """After every optimizer step (the weights are those after update ``step``)."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """After each logged step (``metrics`` are averages over the steps since the previous log)."""

    def on_start(self, step: int) -> None:
        """Once, before the first step of this call: ``step`` is where it starts (0 fresh, k after step k)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a complete checkpoint directory has been written."""


class CollapseWarning(Callback):
    """Warn once when the logged ``embed_std`` (see :mod:`gfm_core.objectives`) falls below ``threshold``.

    Args:
        threshold: the spread of the embeddings below which they may be collapsing to one point.
    """

    def __init__(self, threshold: float = 1e-4) -> None:
        self.threshold = threshold
        self.warned = False

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Log the warning at the first logged step whose ``embed_std`` is below the threshold."""
        if not self.warned and metrics.get("embed_std", math.inf) < self.threshold:
            self.warned = True
            log.warning(
                "step %d: embed_std %.3g < %.3g: the embeddings may be collapsing",
                step,
                metrics["embed_std"],
                self.threshold,
            )
