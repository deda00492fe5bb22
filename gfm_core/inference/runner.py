"""Run a model over batches of tiles with the fit loop's device and precision rules, with an optional progress bar.

``device``: ``auto`` (a visible GPU, else the CPU, logged), ``cpu``, ``cuda[:N]``
(:func:`gfm_core.training.backends.auto_device` / ``resolve_device``); ``precision``: ``fp32`` or ``bf16``
(``torch.autocast``, CPU or CUDA; outputs come back as float32).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.training.backends.devices import auto_device, resolve_device

Precision = Literal["fp32", "bf16"]
T = TypeVar("T")


class TileRunner:
    """``model`` in eval mode on ``device``; :meth:`__call__` maps a float32 numpy batch to a float32 numpy output."""

    def __init__(self, model: nn.Module, *, device: str = "auto", precision: str = "fp32") -> None:
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16' for inference, got {precision!r}")
        self.device = resolve_device(auto_device(device))
        self.precision = precision
        self.model = model.eval().to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """``[B, C, H, W]`` -> the model's output as float32 numpy."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with self._autocast():
            out = self.model(x)
        return out.float().cpu().numpy()


def probe(runner: TileRunner, channels: int, tile: int, default_tile: int) -> np.ndarray:
    """The model's output for one zero tile ``[1, channels, tile, tile]`` (its output shape, before any read).

    Raises:
        DataValidationError: the model rejects tiles of this size (e.g. a Swin built for another input size).
    """
    try:
        return runner(np.zeros((1, channels, tile, tile), np.float32))
    except (RuntimeError, AssertionError, ValueError) as e:  # torch/timm shape checks
        raise DataValidationError(
            f"the model does not take [1, {channels}, {tile}, {tile}] tiles ({type(e).__name__}: {str(e)[:300]}); "
            f"use its input size (tile={default_tile})"
        ) from e


def progress_bar(total: int, desc: str, enabled: bool | None = None) -> Any:
    """A tqdm bar over ``total`` tiles on stderr (``enabled=None``: only when stderr is a terminal)."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="tile", disable=not show, file=sys.stderr)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in consecutive lists of at most ``size`` (lazily: a tile plan is never held as a list).

    Raises:
        ConfigError: ``size`` < 1.
    """
    if size < 1:
        raise ConfigError(f"batch size must be >= 1, got {size}")
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
