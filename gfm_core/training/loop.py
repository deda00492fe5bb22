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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gfm_core.errors import CheckpointError, ConfigError, TrainingDivergedError
from gfm_core.io import write_text
from gfm_core.training.backends import Backend
from gfm_core.training.checkpoint import (
    ResumeMode,
    checkpoint_root,
    load_checkpoint,
    plan_start,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    set_aside,
)
from gfm_core.training.optim import build_optimizer, set_lr
from gfm_core.training.schedule import lr_at

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LoaderFactory = Callable[[int], Iterable[Any]]


@dataclass(frozen=True, kw_only=True)
class LoopCfg:
    """Settings of :func:`fit`. Learning rates are final values: apply ``scale_lr`` before building this.

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
    collapse_std: float = 1e-4  # warn once when the objective's "embed_std" falls below this
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
        callbacks: objects with ``on_start(step)``, ``on_log(step, metrics)`` and/or ``on_checkpoint(step,
            path)``; rank 0 only.

    Raises:
        TrainingDivergedError: the loss of step ``k`` (1-based) is NaN or infinite; raised before its update.
        CheckpointError: the checkpoint to resume from is unusable.
    """
    out_dir = cfg.out_dir
    metrics_path = out_dir / METRICS_FILE
    fused = {"fused": True} if cfg.fused_optimizer else {}
    optimizer = build_optimizer(optimizer_groups, lr=cfg.warmup_lr, betas=cfg.betas, eps=cfg.eps, **fused)
    backend.prepare(objective, optimizer, grad_accum=cfg.grad_accum, clip_grad=cfg.clip_grad)

    # -- resume the same run from its newest complete checkpoint, or start fresh (setting an earlier run aside)
    step, epoch, position = 0, 0, 0
    plan = plan_start(out_dir, resume=cfg.resume, fingerprint=cfg.fingerprint, total_steps=cfg.total_steps)
    backend.barrier()  # every rank has planned before rank 0 moves anything
    moved = None
    if plan.set_aside and backend.is_main:
        if cfg.discard_old:
            log.warning("%s; deleting the earlier run's checkpoints (discard_old)", plan.reason)
            shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)
            (out_dir / METRICS_FILE).unlink(missing_ok=True)
        else:
            moved = set_aside(out_dir, plan.reason, files=[METRICS_FILE])  # logs a warning with the reason
    elif backend.is_main:
        log.info("%s", plan.reason)
    restored = load_checkpoint(plan.checkpoint, backend) if plan.checkpoint is not None else None
    if restored is not None:
        state = restored.client_state.get("loop")
        if not isinstance(state, dict):
            raise CheckpointError(f"{restored.path}: no loop state in the checkpoint (not written by fit())")
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        _warn_config_changes(state.get("cfg", {}), cfg, restored.path)
        log.info("resuming from %s (step %d, epoch %d, batch %d)", restored.path, step, epoch, position)
    if backend.is_main:
        _prepare_out_dir(out_dir, keep_until_step=step)
        for cb in callbacks:
            if hasattr(cb, "on_start"):
                cb.on_start(step)
    backend.barrier()
    batches = _MicroBatches(loader_factory, seed=cfg.seed, rank=backend.rank, epoch=epoch, position=position)
    if restored is not None and restored.rng_state is not None:
        restore_rng_state(restored.rng_state)  # after the data skip, so the next batch and dropout match

    start_step = step
    window = _Window()
    history: list[dict[str, float]] = []  # one record per log: {"step": int, **metrics}
    last_metrics = _last_record(metrics_path) if restored is not None else {}
    last_checkpoint = restored.path if restored is not None else None
    collapse_warned = False
    show_bar = cfg.progress and backend.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.total_steps, initial=step, disable=not show_bar, desc="train", dynamic_ncols=True)
    try:
        while step < cfg.total_steps:
            # 1. learning rate of this optimizer step
            lr = lr_at(
                step,
                total_steps=cfg.total_steps,
                warmup_steps=cfg.warmup_steps,
                base_lr=cfg.base_lr,
                warmup_lr=cfg.warmup_lr,
                min_lr=cfg.min_lr,
            )
            set_lr(backend.optimizer, lr)

            # 2. forward -> finite? -> backward, per micro-batch; the last backend.step() clips and updates
            grad_norm = None
            for _ in range(cfg.grad_accum):
                batch = batches.next()
                out = backend.forward(batch)
                components = _scalar_components(out)
                if not _all_finite(components["loss"], backend):
                    raise TrainingDivergedError(step + 1, components)
                backend.backward(out["loss"])
                grad_norm = backend.step()
                window.add(components, _batch_size(batch))
            step += 1
            window.add_grad_norm(grad_norm)
            bar.update(1)
            if backend.is_main:
                for cb in callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(step)

            # 3. log: averages since the last log, reduced over ranks
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                metrics = window.reduce(backend, lr=lr, epoch=batches.epoch)
                if backend.is_main:  # evaluations of the weights now (e.g. held-out views)
                    for cb in callbacks:
                        if hasattr(cb, "measure"):
                            metrics.update(cb.measure(step))
                record = {"step": step, **metrics}
                history.append(record)
                last_metrics = metrics
                if backend.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    for cb in callbacks:
                        if hasattr(cb, "on_log"):
                            cb.on_log(step, dict(metrics))
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.3g}")
                if not collapse_warned and metrics.get("embed_std", math.inf) < cfg.collapse_std:
                    collapse_warned = True
                    log.warning(
                        "step %d: embed_std %.3g < %.3g: the embeddings may be collapsing",
                        step,
                        metrics["embed_std"],
                        cfg.collapse_std,
                    )

            # 4. checkpoint (every rank takes part; rank 0 renames and prunes)
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                client_state = {
                    "loop": {
                        "step": step,
                        "epoch": batches.epoch,
                        "position": batches.position,
                        "cfg": cfg.to_dict(),
                    }
                }
                last_checkpoint = save_checkpoint(
                    out_dir, step, backend, client_state, keep=cfg.keep_checkpoints, fingerprint=cfg.fingerprint
                )
                if backend.is_main:
                    for cb in callbacks:
                        if hasattr(cb, "on_checkpoint"):
                            cb.on_checkpoint(step, last_checkpoint)
                window.restart_clock()  # images/s excludes checkpoint time
    finally:
        bar.close()
    return FitResult(
        steps=step,
        metrics=last_metrics,
        checkpoint=last_checkpoint,
        history=history,
        resumed_from=restored.path if restored is not None else None,
        start_step=start_step,
        start_reason=plan.reason,
        set_aside=moved,
    )


# ----------------------------------------------------------------------------------------------- helpers


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global-RNG seed at the start of ``epoch`` on ``rank``."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class _MicroBatches:
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


class _Window:
    """Sums of loss components, samples and grad norms since the last log."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.samples = 0
        self.grad_norms: list[float] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, components: dict[str, float], samples: int) -> None:
        for k, v in components.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro += 1
        self.samples += samples

    def add_grad_norm(self, norm: float | None) -> None:
        if norm is not None and not math.isnan(norm):
            self.grad_norms.append(norm)

    def reduce(self, backend: Backend, *, lr: float, epoch: int) -> dict[str, float]:
        """Mean of each component over micro-batches and ranks (a collective), then reset."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / self.micro for k in keys], dtype=torch.float64)
        values = backend.all_reduce_mean(values)
        metrics = dict(zip(keys, values.tolist(), strict=True))
        metrics["lr"] = lr
        if self.grad_norms:
            metrics["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        metrics["images_per_s"] = self.samples * backend.world_size / elapsed
        metrics["epoch"] = float(epoch)
        self._reset()
        return metrics


def _scalar_components(out: Any) -> dict[str, float]:
    """Every scalar entry of the objective's output as a float (one device sync); non-scalars are skipped."""
    if not isinstance(out, dict) or "loss" not in out:
        raise ConfigError(
            f"the objective must return a dict with a 'loss' entry, got {type(out).__name__}"
            + (f" with keys {sorted(out)}" if isinstance(out, dict) else "")
        )
    names, tensors, plain = [], [], {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                names.append(k)
                tensors.append(v.detach().reshape(()).float())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            plain[k] = float(v)
    if "loss" not in names:
        raise ConfigError(f"the objective's 'loss' must be a scalar tensor, got {out['loss']!r:.80}")
    values = torch.stack(tensors).cpu().tolist()
    return {**dict(zip(names, values, strict=True)), **plain}


def _all_finite(loss: float, backend: Backend) -> bool:
    """True when the loss is finite on every rank (all ranks then raise together instead of one hanging)."""
    bad = 0.0 if math.isfinite(loss) else 1.0
    if backend.world_size > 1:
        bad = float(backend.all_reduce_mean(torch.tensor([bad], dtype=torch.float64))[0])
    return bad == 0.0


def _batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a (nested) batch; 0 when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _batch_size(item)
        if n:
            return n
    return 0


def _prepare_out_dir(out_dir: Path, keep_until_step: int) -> None:
    """Drop ``metrics.jsonl`` records past the step this run starts from (they belong to a lost future)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    if metrics_path.exists():
        kept = []
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                log.warning("%s: dropping an unreadable line: %.80s", metrics_path, line)
                continue
            if record.get("step", 0) <= keep_until_step:
                kept.append(line)
        write_text(metrics_path, "".join(line + "\n" for line in kept))


def _last_record(metrics_path: Path) -> dict[str, float]:
    if not metrics_path.is_file():
        return {}
    lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    record = json.loads(lines[-1])
    record.pop("step", None)
    return {k: float(v) for k, v in record.items()}


_IGNORED_ON_RESUME = {"resume", "progress", "out_dir", "fingerprint", "discard_old"}


def _warn_config_changes(saved: dict[str, Any], cfg: LoopCfg, path: Path) -> None:
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
