"""Learning-rate schedule: linear warm-up, then cosine decay, evaluated per optimizer step.

The paper's recipe (GFM, from SimMIM) is AdamW with ``base_lr = 2e-4``, ``warmup_lr = 1e-6`` and
``min_lr = 1e-5``, each multiplied by ``global_batch / 512`` (:func:`gfm_core.training.setup.schedule`), 10
warm-up epochs out of 100, stepped per iteration.

SimMIM builds timm's ``CosineLRScheduler`` with ``warmup_prefix=False``: its cosine is evaluated at
``step/total_steps`` over *all* steps, so the lr drops right after warm-up. :func:`lr_at` runs the cosine over
the post-warm-up steps only, so the curve is continuous and reaches ``base_lr``. With 10 of 100 warm-up epochs
SimMIM's curve lies below this one by 2.4% of ``base_lr - min_lr`` right after warm-up and by at most 9.6%
mid-run; both end at ``min_lr``.
"""

from __future__ import annotations

import math

REFERENCE_BATCH = 512


def lr_at(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the lr used by the first update is ``lr_at(0)``).

    Steps ``0 .. warmup_steps`` rise linearly from ``warmup_lr`` to ``base_lr``; the remaining steps follow a
    half cosine from ``base_lr`` down to ``min_lr`` at ``step == total_steps``. Steps past the end stay at
    ``min_lr``.

    Raises:
        ValueError: ``step < 0``, ``total_steps < 1``, ``warmup_steps`` outside ``[0, total_steps]`` or a
            negative lr.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if min(base_lr, warmup_lr, min_lr) < 0:
        raise ValueError(f"learning rates must be >= 0, got base={base_lr} warmup={warmup_lr} min={min_lr}")
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
