"""The setup every training run shares, pretraining and fine-tuning alike: the execution backend named by the
config section, the per-epoch data loader over this rank's share of a seeded permutation, and the schedule.

Both sections (``pretrain``, ``finetune``) name these settings alike: ``backend``, ``precision``, ``zero_stage``,
``epochs``, ``warmup_epochs``, ``max_steps``, ``lr_scaling``, ``base_lr``/``warmup_lr``/``min_lr``, ``betas``,
``clip_grad``, ``grad_accum``, ``log_every``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gfm_core.config import FinetuneCfg, PretrainCfg
from gfm_core.training.schedule import REFERENCE_BATCH

#: The config sections whose runs go through :func:`~gfm_core.training.loop.fit` (same field names).
RunSection = PretrainCfg | FinetuneCfg


def schedule(cfg: RunSection, *, steps_per_epoch: int, epochs: int, limit: int | None, global_batch: int
             ) -> dict[str, Any]:
    """The schedule part of a :class:`~gfm_core.training.loop.LoopCfg`.

    ``epochs`` of ``steps_per_epoch`` optimizer steps, capped at ``limit``; warm-up for the section's share
    ``warmup_epochs / epochs`` of them (the same share when capped); learning rates times
    ``global_batch / 512`` under ``lr_scaling: linear``.
    """
    full = epochs * steps_per_epoch
    total = min(full, limit) if limit else full
    k = global_batch / REFERENCE_BATCH if cfg.lr_scaling == "linear" else 1.0
    return dict(
        total_steps=total, warmup_steps=round(total * cfg.warmup_epochs / cfg.epochs), base_lr=cfg.base_lr * k,
        warmup_lr=cfg.warmup_lr * k, min_lr=cfg.min_lr * k, betas=cfg.betas, clip_grad=cfg.clip_grad,
        grad_accum=cfg.grad_accum, log_every=min(cfg.log_every, total), fused_optimizer=cfg.backend == "torch",
    )


def with_effective_precision(cfg: RunSection, device: str) -> Any:
    """``cfg`` with the precision it runs at on ``device`` (:func:`~gfm_core.training.backends.base.
    effective_precision`: bf16 falls back to fp32 on a CPU without bf16 kernels)."""
    from gfm_core.training.backends.base import effective_precision

    precision = effective_precision(cfg.precision, device)
    return cfg if precision == cfg.precision else cfg.model_copy(update={"precision": precision})


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
