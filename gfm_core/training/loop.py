"""The one training loop: pretraining and every fine-tuning task go through :func:`fit`.

Each optimizer step, in order (nanoGPT's order):

1. set the learning rate from the pure schedule :func:`~gfm_core.training.schedule.lr_at`;
2. for each of ``grad_accum`` micro-batches: forward -> check that the loss is finite -> backward ->
   ``backend.step()``, which clips and updates the weights after the last micro-batch only;
3. log every ``log_every`` steps (all loss components, lr, grad norm, images/s, and what callbacks with a
   ``measure(step)`` method return, on rank 0) to callbacks and ``metrics.jsonl``;
4. checkpoint every ``checkpoint_every`` steps and at the end.

The objective is an ``nn.Module`` whose ``forward(batch)`` returns a dict with ``"loss"`` and any named scalar
components (timm's task contract); every scalar entry is logged. ``loader_factory(epoch)`` returns this rank's
micro-batches of one epoch and must give the same batches for the same epoch (shard and shuffle with a
generator seeded from the epoch, as ``DistributedSampler.set_epoch`` does). The loop seeds the global RNGs
from ``(seed, epoch, rank)`` before calling it, so loaders that use the global RNG are deterministic too.

Resuming restores weights, optimizer (and loss scaler), the position inside the epoch (by re-iterating the
epoch's loader and dropping the batches already used) and then the RNG states, so the next step's loss is
identical to an uninterrupted run's. Only a checkpoint of the same run is continued: ``LoopCfg.fingerprint``
is written with every checkpoint and compared on start (:func:`~gfm_core.training.checkpoint.plan_start`); a
fresh start moves an earlier run's checkpoints and metrics aside, it does not delete them.

The loop knows no metric names: watching them is the callbacks' job (:mod:`gfm_core.training.callbacks`, e.g.
``CollapseWarning``). The micro-batch stream lives in :mod:`~gfm_core.training.batches`, the logged averages in
:mod:`~gfm_core.training.metrics` (with ``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from gfm_core.errors import CheckpointError, ConfigError, TrainingDivergedError
from gfm_core.training.backends import Backend
from gfm_core.training.batches import LoaderFactory, MicroBatches, batch_size
from gfm_core.training.batches import epoch_seed as epoch_seed
from gfm_core.training.callbacks import Callback as Callback
from gfm_core.training.checkpoint import (
    Restored,
    ResumeMode,
    StartPlan,
    checkpoint_root,
    load_checkpoint,
    plan_start,
    restore_rng_state,
    save_checkpoint,
    set_aside,
)
from gfm_core.training.ledger import StepFlops
from gfm_core.training.metrics import (
    METRICS_FILE,
    LogWindow,
    all_finite,
    append_record,
    last_record,
    scalar_components,
    trim_records,
)
from gfm_core.training.optim import build_optimizer, set_lr
from gfm_core.training.schedule import lr_at

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoopCfg:
    """Settings of :func:`fit`. Learning rates are final values (:func:`gfm_core.training.setup.schedule`).

    ``resume=True`` continues from the newest complete checkpoint under ``out_dir`` when there is one and its
    fingerprint equals ``fingerprint``; ``resume="unfinished"`` continues only an interrupted run (a finished
    one starts over); ``resume=False`` starts fresh. A fresh start moves an earlier run's ``checkpoints/`` and
    ``metrics.jsonl`` to ``out_dir/checkpoints.stale-<time>/`` (with a warning and the reason), so a later resume
    cannot pick up a stale checkpoint; with ``discard_old`` it deletes them instead (fine-tuning's throwaway
    end-of-run checkpoint).
    """

    total_steps: int  # optimizer steps
    out_dir: Path
    grad_accum: int = 1  # micro-batches per optimizer step
    base_lr: float = 2e-4
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = 5.0  # max global grad norm; None = no clipping
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int | None = 3  # None keeps all
    seed: int = 0
    resume: ResumeMode = True
    fingerprint: dict[str, str] | None = None  # what the run is (data, params, teacher hashes); None = unchecked
    discard_old: bool = False  # a fresh start deletes an earlier run's checkpoints instead of setting them aside
    progress: bool = True  # tqdm bar (only on rank 0 and only when stderr is a terminal)
    fused_optimizer: bool = False  # torch's fused AdamW kernel (TorchBackend; ~3.5x faster step on CPU too)

    def __post_init__(self) -> None:
        checks = [
            (self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (
                0 <= self.warmup_steps <= self.total_steps,
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}",
            ),
            (min(self.base_lr, self.warmup_lr, self.min_lr) >= 0, "learning rates must be >= 0"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (
                self.keep_checkpoints is None or self.keep_checkpoints >= 1,
                f"keep_checkpoints must be >= 1 or None, got {self.keep_checkpoints}",
            ),
            (
                self.clip_grad is None or self.clip_grad > 0,
                f"clip_grad must be > 0 or None, got {self.clip_grad}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"LoopCfg: {msg}")
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (paths as strings, tuples as lists)."""
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["betas"] = list(self.betas)
        return d


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns (on every rank)."""

    steps: int  # optimizer steps completed in total
    metrics: dict[str, float]  # the last logged metrics
    checkpoint: Path | None  # the last complete checkpoint
    history: list[dict[str, float]] = field(default_factory=list)  # records logged by this call, with "step"
    resumed_from: Path | None = None
    start_step: int = 0  # the step this call started from (the resumed checkpoint's step, or 0)
    start_reason: str = ""  # why it resumed or started fresh
    set_aside: Path | None = None  # where an earlier run's files went (rank 0 only)
    flops_per_step: int | None = None  # FLOPs of one optimizer step on all ranks (measured on the first step)



def fit(
    objective: nn.Module,
    loader_factory: LoaderFactory,
    backend: Backend,
    cfg: LoopCfg,
    optimizer_groups: list[dict[str, Any]],
    callbacks: Sequence[Any] = (),
) -> FitResult:
    """Train ``objective`` for ``cfg.total_steps`` optimizer steps (contract: see the module docstring).

    Args:
        objective: ``forward(batch) -> {"loss": tensor, <component>: scalar, ...}`` with the same keys on
            every call and rank; its train/eval mode is left as the caller set it (keep frozen teachers in
            eval mode by overriding ``train()``).
        loader_factory: ``epoch -> iterable`` of this rank's micro-batches (dict/tuple/tensor; moved by the
            backend).
        backend: :class:`~gfm_core.training.backends.TorchBackend` or ``DeepSpeedBackend`` (not yet prepared).
        cfg: loop settings.
        optimizer_groups: from :func:`~gfm_core.training.optim.param_groups` (weight decay, lr scales).
        callbacks: objects with any of the :class:`~gfm_core.training.callbacks.Callback` hooks (``on_start``,
            ``on_step_end``, ``measure``, ``on_log``, ``on_checkpoint``); rank 0 only.

    Raises:
        TrainingDivergedError: the loss of step ``k`` (1-based) is NaN or infinite; raised before its update.
        CheckpointError: the checkpoint to resume from is unusable.
    """
    fused = {"fused": True} if cfg.fused_optimizer else {}
    optimizer = build_optimizer(optimizer_groups, lr=cfg.warmup_lr, betas=cfg.betas, eps=cfg.eps, **fused)
    backend.prepare(objective, optimizer, grad_accum=cfg.grad_accum, clip_grad=cfg.clip_grad)
    start = _begin(cfg, backend, loader_factory, callbacks)  # resume the same run, or start fresh
    step, batches, restored = start.step, start.batches, start.restored

    window = LogWindow()
    history: list[dict[str, float]] = []  # one record per log: {"step": int, **metrics}
    last_metrics = last_record(cfg.out_dir / METRICS_FILE) if restored is not None else {}
    last_checkpoint = restored.path if restored is not None else None
    flops_per_step: int | None = None
    show_bar = cfg.progress and backend.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.total_steps, initial=step, disable=not show_bar, desc="train", dynamic_ncols=True)
    try:
        while step < cfg.total_steps:
            # 1. learning rate of this optimizer step
            lr = _lr_at(step, cfg)
            set_lr(backend.optimizer, lr)

            # 2. forward -> finite? -> backward, per micro-batch; the last backend.step() clips and updates
            grad_norm, flops = _optimizer_step(backend, batches, window, cfg.grad_accum, step=step + 1,
                                               count_flops=flops_per_step is None)  # the call's first step
            flops_per_step = flops * backend.world_size if flops is not None else flops_per_step
            step += 1
            window.add_grad_norm(grad_norm)
            bar.update(1)
            if backend.is_main:
                _notify(callbacks, "on_step_end", step)

            # 3. log: averages since the last log, reduced over ranks
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                metrics = window.reduce(backend, lr=lr, epoch=batches.epoch)
                last_metrics = _log(step, metrics, backend, callbacks, cfg.out_dir / METRICS_FILE)
                history.append({"step": step, **last_metrics})
                if backend.is_main:
                    bar.set_postfix(loss=f"{last_metrics['loss']:.4g}", lr=f"{lr:.3g}")

            # 4. checkpoint (every rank takes part; rank 0 renames and prunes)
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                last_checkpoint = _checkpoint(step, batches, backend, cfg, callbacks)
                window.restart_clock()  # images/s excludes checkpoint time
    finally:
        bar.close()
    return FitResult(
        steps=step,
        metrics=last_metrics,
        checkpoint=last_checkpoint,
        history=history,
        resumed_from=restored.path if restored is not None else None,
        start_step=start.step,
        start_reason=start.plan.reason,
        set_aside=start.moved,
        flops_per_step=flops_per_step,
    )


# ----------------------------------------------------------------------------------------------- start


@dataclass(frozen=True)
class _Start:
    """Where :func:`fit` starts: the step, the micro-batch stream positioned there, and how it got there."""

    step: int
    batches: MicroBatches
    plan: StartPlan
    restored: Restored | None
    moved: Path | None  # where rank 0 set an earlier run's files aside


def _begin(cfg: LoopCfg, backend: Backend, loader_factory: LoaderFactory, callbacks: Sequence[Any]) -> _Start:
    """Resume the same run from its newest complete checkpoint, or start fresh (setting an earlier run aside)."""
    plan = plan_start(cfg.out_dir, resume=cfg.resume, fingerprint=cfg.fingerprint, total_steps=cfg.total_steps)
    backend.barrier()  # every rank has planned before rank 0 moves anything
    moved = _clear_earlier_run(plan, cfg, backend)
    step, epoch, position = 0, 0, 0
    restored = load_checkpoint(plan.checkpoint, backend) if plan.checkpoint is not None else None
    if restored is not None:
        step, epoch, position = _loop_state(restored, cfg)
    if backend.is_main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        trim_records(cfg.out_dir / METRICS_FILE, keep_until_step=step)
        _notify(callbacks, "on_start", step)
    backend.barrier()
    batches = MicroBatches(loader_factory, seed=cfg.seed, rank=backend.rank, epoch=epoch, position=position)
    if restored is not None and restored.rng_state is not None:
        restore_rng_state(restored.rng_state)  # after the data skip, so the next batch and dropout match
    return _Start(step, batches, plan, restored, moved)


def _clear_earlier_run(plan: StartPlan, cfg: LoopCfg, backend: Backend) -> Path | None:
    """Rank 0: on a fresh start, move an earlier run's checkpoints and metrics aside (or delete them with
    ``discard_old``); return where they went."""
    if not backend.is_main:
        return None
    if not plan.set_aside:
        log.info("%s", plan.reason)
        return None
    if cfg.discard_old:
        log.warning("%s; deleting the earlier run's checkpoints (discard_old)", plan.reason)
        shutil.rmtree(checkpoint_root(cfg.out_dir), ignore_errors=True)
        (cfg.out_dir / METRICS_FILE).unlink(missing_ok=True)
        return None
    return set_aside(cfg.out_dir, plan.reason, files=[METRICS_FILE])  # logs a warning with the reason


def _loop_state(restored: Restored, cfg: LoopCfg) -> tuple[int, int, int]:
    """``(step, epoch, position)`` saved by :func:`_checkpoint`; warns when the loop config changed since."""
    state = restored.client_state.get("loop")
    if not isinstance(state, dict):
        raise CheckpointError(f"{restored.path}: no loop state in the checkpoint (not written by fit())")
    step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
    _warn_config_changes(state.get("cfg", {}), cfg, restored.path)
    log.info("resuming from %s (step %d, epoch %d, batch %d)", restored.path, step, epoch, position)
    return step, epoch, position


_IGNORED_ON_RESUME = {"resume", "progress", "out_dir", "fingerprint", "discard_old"}


def _warn_config_changes(saved: dict[str, Any], cfg: LoopCfg, path: Path) -> None:
    """Warn when a resumed run's loop settings differ from the checkpoint's (it will not match an uninterrupted run)."""
    current = cfg.to_dict()
    changed = {
        k: (saved[k], current[k])
        for k in saved.keys() & current.keys()
        if k not in _IGNORED_ON_RESUME and saved[k] != current[k]
    }
    if changed:
        desc = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        log.warning(
            "%s: resuming with a changed loop config (%s); the run will not match an uninterrupted one",
            path,
            desc,
        )


# ----------------------------------------------------------------------------------------------- one step


def _lr_at(step: int, cfg: LoopCfg) -> float:
    """Learning rate of optimizer step ``step`` (0-based): warm-up, then cosine decay."""
    return lr_at(
        step,
        total_steps=cfg.total_steps,
        warmup_steps=cfg.warmup_steps,
        base_lr=cfg.base_lr,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
    )


def _optimizer_step(
    backend: Backend, batches: MicroBatches, window: LogWindow, grad_accum: int, *, step: int, count_flops: bool
) -> tuple[float | None, int | None]:
    """Optimizer step ``step`` (1-based) over ``grad_accum`` micro-batches: ``(grad norm, this rank's FLOPs if
    counted)`` (:class:`~gfm_core.training.ledger.StepFlops`).

    Raises:
        TrainingDivergedError: a micro-batch's loss is not finite (on any rank); raised before the update.
    """
    grad_norm = None
    with StepFlops(enabled=count_flops) as counted:
        for _ in range(grad_accum):
            batch = batches.next()
            out = backend.forward(batch)
            components = scalar_components(out)
            if not all_finite(components["loss"], backend):
                raise TrainingDivergedError(step, components)
            backend.backward(out["loss"])
            grad_norm = backend.step()  # None until the last micro-batch, which clips and updates
            window.add(components, batch_size(batch))
    return grad_norm, counted.flops


def _log(
    step: int, metrics: dict[str, float], backend: Backend, callbacks: Sequence[Any], metrics_path: Path
) -> dict[str, float]:
    """Rank 0: add the callbacks' measurements, append the record to ``metrics.jsonl``, call ``on_log``."""
    if backend.is_main:
        for cb in callbacks:  # evaluations of the weights now (e.g. held-out views)
            if hasattr(cb, "measure"):
                metrics.update(cb.measure(step))
        append_record(metrics_path, {"step": step, **metrics})
        for cb in callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(step, dict(metrics))
    return metrics


def _checkpoint(step: int, batches: MicroBatches, backend: Backend, cfg: LoopCfg, callbacks: Sequence[Any]) -> Path:
    """Save the weights, optimizer and loop state (every rank takes part); rank 0 calls ``on_checkpoint``."""
    client_state = {
        "loop": {"step": step, "epoch": batches.epoch, "position": batches.position, "cfg": cfg.to_dict()}
    }
    path = save_checkpoint(
        cfg.out_dir, step, backend, client_state, keep=cfg.keep_checkpoints, fingerprint=cfg.fingerprint
    )
    if backend.is_main:
        _notify(callbacks, "on_checkpoint", step, path)
    return path


def _notify(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Call ``hook(*args)`` on every callback that has it."""
    for cb in callbacks:
        if hasattr(cb, hook):
            getattr(cb, hook)(*args)
