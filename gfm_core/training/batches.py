"""Micro-batches for the loop: an endless, resumable stream over epochs, seeded per ``(seed, epoch, rank)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.training.checkpoint import seed_everything

LoaderFactory = Callable[[int], Iterable[Any]]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global-RNG seed at the start of ``epoch`` on ``rank``."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class MicroBatches:
    """An endless stream of micro-batches over epochs that knows its (epoch, position) for checkpoints."""

    def __init__(self, factory: LoaderFactory, *, seed: int, rank: int, epoch: int = 0, position: int = 0):
        self._factory, self._seed, self._rank = factory, seed, rank
        self._start(epoch)
        for i in range(position):  # fast-forward to the saved position (same batches, same worker RNG draws)
            try:
                next(self._it)
            except StopIteration:
                raise CheckpointError(
                    f"the loader of epoch {epoch} yields {i} batches, but the checkpoint was taken after "
                    f"{position}: the data or loader changed since (start fresh with resume: false)"
                ) from None
        self.position = position

    def _start(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        seed_everything(epoch_seed(self._seed, epoch, self._rank))
        self._it: Iterator[Any] = iter(self._factory(epoch))

    def next(self) -> Any:
        """The next micro-batch; starts the next epoch (reseeded) when this one is used up."""
        try:
            batch = next(self._it)
        except StopIteration:
            if self.position == 0:
                raise ConfigError(f"loader_factory({self.epoch}) yielded no batches") from None
            self._start(self.epoch + 1)
            try:
                batch = next(self._it)
            except StopIteration:
                raise ConfigError(f"loader_factory({self.epoch}) yielded no batches") from None
        self.position += 1
        return batch


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a (nested) batch; 0 when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = batch_size(item)
        if n:
            return n
    return 0
