"""The setup every training run shares, pretraining and fine-tuning alike: the execution backend named by the
config section and the per-epoch data loader over this rank's share of a seeded permutation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:  # the backends load only when one is made
    from gfm_core.training.backends import Precision


class RunSection(Protocol):
    """What a config section (``pretrain``, ``finetune``) says about how its runs execute."""

    @property
    def backend(self) -> str: ...
    @property
    def precision(self) -> Precision: ...
    @property
    def zero_stage(self) -> int: ...


def make_backend(cfg: RunSection, device: str, micro_batch: int) -> Any:
    """The execution backend named by ``cfg.backend`` (``torch`` or ``deepspeed``) on ``device``."""
    from gfm_core.training.backends import DeepSpeedBackend, TorchBackend

    if cfg.backend == "deepspeed":
        return DeepSpeedBackend(device, cfg.precision, zero_stage=cfg.zero_stage, micro_batch_size=micro_batch)
    return TorchBackend(device, cfg.precision)


def loader_factory(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0, world: int = 1
) -> Callable[[int], DataLoader]:
    """``epoch -> DataLoader`` over this rank's disjoint share of a seeded permutation (the same on every rank).

    A dataset with ``set_epoch`` (the pretraining stream: crops and masks per epoch) is told the epoch first.
    """
    per_rank = len(dataset) // world  # type: ignore[arg-type]

    def factory(epoch: int) -> DataLoader:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = torch.randperm(
            len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # type: ignore[arg-type]
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order[rank * per_rank : (rank + 1) * per_rank].tolist(),
            num_workers=num_workers,
            drop_last=True,
            persistent_workers=False,
        )

    return factory
