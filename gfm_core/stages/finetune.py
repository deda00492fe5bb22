"""The fine-tuning stage: every (task, model, seed) through the one training loop, then a test pass.

One run (:func:`finetune`):

1. load the backbone of the model (:func:`gfm_core.models.loading.load_task_backbone`: a pretraining export,
   the ImageNet teacher's checkpoint, or a random init) at the task's input size;
2. attach a new head of the task's kind (:mod:`gfm_core.models.heads`) and wrap both in the objective of the
   task's protocol (:mod:`gfm_core.objectives.protocols`: full fine-tuning, frozen backbone, or linear probe);
3. train with :func:`gfm_core.training.loop.fit` (warm-up + cosine, AdamW, layer-wise lr decay) on the task's
   train split (a seeded label-fraction subset);
4. score it (:mod:`gfm_core.evaluation.scoring`): ``scoring: test`` runs the test split once after training;
   ``scoring: paper`` scores the val split after every epoch and keeps the best epoch (GFM's protocol).
   Torchmetrics values plus per-sample statistics for the paired bootstrap (:mod:`gfm_core.evaluation.results`:
   ``result.json`` and ``scores.parquet``, atomic writes); ``result.json`` records protocol and scoring.

Outputs: ``<finetune.out_dir>/<task>/<model>/seed_<seed>/`` holds ``result.json``, ``scores.parquet``,
``metrics.jsonl``, ``backbone_start.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from gfm_core.config import BackboneSpec, ComputeCfg, FinetuneCfg, Params, TaskCfg
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.evaluation.metrics import TaskMetrics, build_metrics
from gfm_core.evaluation.results import (
    RESULT_FILE,
    SCORES_FILE,
    FinetuneResult,
    load_result,
    result_dir,
    save_scores,
)
from gfm_core.evaluation.scoring import BestEpoch, evaluate_objective
from gfm_core.io import read_json, write_json
from gfm_core.models.heads import build_task_model
from gfm_core.models.loading import LoadedBackbone, distilled_teacher, load_task_backbone
from gfm_core.objectives.mixing import batch_mix
from gfm_core.objectives.protocols import build_objective
from gfm_core.task_heads import get_head

__all__ = ["evaluate_objective", "finetune", "log_runs", "run_finetune", "run_finetune_task"]

log = logging.getLogger(__name__)

START_FILE = "backbone_start.json"  # which backbone bytes the run's checkpoints started from


@dataclass
class _Data:
    """A run's training set and the split it is scored on (``test``, or ``val`` under ``scoring: paper``)."""

    train: Any
    test: Any


def _datasets(cfg: FinetuneCfg, task: TaskCfg, spec: BackboneSpec, loaded: LoadedBackbone, seed: int) -> _Data:
    """The train split (a seeded label-fraction subset, augmented) and the scored split, normalised for the
    backbone.

    Raises:
        ConfigError: the task reads another number of bands than the backbone takes, or has no val split to
            score under ``scoring: paper``.
    """
    from gfm_core.data.tasks.dataset import TaskDataset, label_subset
    from gfm_core.data.tasks.layouts import list_task, task_splits

    if cfg.scoring == "paper" and "val" not in task_splits(task):
        raise ConfigError(f"task {task.name!r} ({task.layout} layout) has no val split, which finetune.scoring: "
                          f"paper scores; use scoring: test")
    n_train = len(list_task(task, "train").refs)
    subset = label_subset(n_train, task.label_fraction, cfg.subset_seed if cfg.subset_seed is not None else seed)
    train = TaskDataset(task, "train", mean=loaded.mean, std=loaded.std, train=True, augment=cfg.augment,
                        vflip=cfg.vflip, crop_scale=cfg.crop_scale, indices=subset, cache=cfg.cache_samples)
    paper = cfg.scoring == "paper"  # val is scored every epoch: cache it like the training set
    test = TaskDataset(task, "val" if paper else "test", mean=loaded.mean, std=loaded.std,
                       cache=paper and cfg.cache_samples)
    in_chans = int(getattr(loaded.model, "in_chans", None) or len(loaded.mean))
    if train.channels != in_chans:
        raise ConfigError(
            f"task {task.name!r} reads {train.channels} bands but backbone {spec.name!r} ({loaded.arch}) takes "
            f"{in_chans}; set finetune.tasks[{task.name}].bands (e.g. [3, 2, 1] for Landsat RGB)"
        )
    return _Data(train, test)


def _loop_cfg(cfg: FinetuneCfg, task: TaskCfg, n_train: int, batch: int, world: int, out_dir: Path, seed: int,
              max_steps: int | None, resume: bool, progress: bool) -> Any:
    """The fit() settings of a run: the schedule in steps and the learning rates scaled by global batch / 512.

    Raises:
        ConfigError: the training set gives no full optimizer step.
    """
    from gfm_core.training.loop import LoopCfg
    from gfm_core.training.setup import schedule

    plan = schedule(cfg, steps_per_epoch=_steps_per_epoch(cfg, task, n_train, batch, world),
                    epochs=task.epochs or cfg.epochs,
                    limit=max_steps or task.max_steps or cfg.max_steps, global_batch=batch * cfg.grad_accum * world)
    return LoopCfg(
        **plan, out_dir=out_dir, checkpoint_every=plan["total_steps"], keep_checkpoints=1, seed=seed, resume=resume,
        discard_old=True,  # one end-of-run checkpoint per run; the product is the result JSON
        progress=progress,
    )


def _steps_per_epoch(cfg: FinetuneCfg, task: TaskCfg, n_train: int, batch: int, world: int) -> int:
    """Optimizer steps per pass over the training set.

    Raises:
        ConfigError: the training set gives no full optimizer step.
    """
    steps = n_train // world // batch // cfg.grad_accum
    if steps < 1:
        raise ConfigError(
            f"task {task.name!r}: {n_train} training samples give no full step of batch {batch} x "
            f"grad_accum {cfg.grad_accum} x {world} rank(s)"
        )
    return steps


def finetune(
    cfg: FinetuneCfg,
    task: TaskCfg,
    spec: BackboneSpec,
    *,
    seed: int,
    out_dir: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = False,
    callbacks: Sequence[Any] = (),
    compute: ComputeCfg | None = None,
) -> FinetuneResult:
    """Fine-tune ``spec``'s backbone on ``task`` with a new head under the task's protocol, then score it
    (module docstring).

    Args:
        cfg: the ``finetune`` section (schedule, batch, layer decay, backend, ...).
        task: the task section.
        spec: the backbone source.
        seed: head init, data order, augmentation (and the subset when ``cfg.subset_seed`` is None).
        out_dir: run folder (checkpoints, metrics.jsonl, result.json, scores.parquet).
        max_steps: cap on optimizer steps (overrides ``task.max_steps``/``cfg.max_steps``).
        compute: prices of the run's compute ledger (``result.json`` ``compute``; default: the section's defaults).

    Raises:
        ConfigError, CheckpointError, DatasetNotFoundError, DataValidationError: bad config, weights or data.
    """
    from gfm_core.training.backends import auto_device
    from gfm_core.training.checkpoint import seed_everything
    from gfm_core.training.ledger import metered
    from gfm_core.training.loop import fit
    from gfm_core.training.optim import layer_decay_fn, param_groups
    from gfm_core.training.setup import loader_factory, make_backend, with_effective_precision

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device = auto_device(cfg.device)
    cfg = with_effective_precision(cfg, device)
    seed_everything(seed)
    loaded = load_task_backbone(spec, task, drop_path_rate=cfg.drop_path_rate)
    _bind_start(out_dir / START_FILE, spec, loaded.sha256, resume)
    data = _datasets(cfg, task, spec, loaded, seed)
    seed_everything(seed)  # the head's init depends on the seed only, not on what was loaded before
    model, objective, protocol = _objective(cfg, task, loaded, data)
    batch = min(task.batch_size or cfg.batch_size, len(data.train))
    if batch < (task.batch_size or cfg.batch_size):
        log.warning("task %s: batch size reduced to the %d training samples", task.name, batch)
    backend = make_backend(cfg, device, batch)
    loop_cfg = _loop_cfg(cfg, task, len(data.train), batch, backend.world_size, out_dir, seed, max_steps, resume,
                         progress)
    log.info("finetune %s on %s (seed %d, %s, scoring %s): %d train / %d %s samples, %d steps of batch %d, %s on %s",
             spec.name, task.name, seed, protocol, cfg.scoring, len(data.train), len(data.test),
             data.test.split, loop_cfg.total_steps, batch * cfg.grad_accum * backend.world_size, cfg.precision, device)
    scorer = None
    if cfg.scoring == "paper":  # val after every epoch, rank 0 (a fit callback)
        every = task.eval_every or cfg.eval_every or _steps_per_epoch(cfg, task, len(data.train), batch,
                                                                      backend.world_size)
        scorer = BestEpoch(backend, _eval_loader(cfg, data), lambda: _new_metrics(task, data), _headline(task),
                           steps_per_epoch=every, total_steps=loop_cfg.total_steps, out_dir=out_dir,
                           meta=_scores_meta(task, spec, seed), paper_batch=cfg.eval_batch_size)
    with metered(str(device), backend.world_size) as meter:
        fit_res = fit(
            objective, loader_factory(data.train, batch, cfg.num_workers, seed, backend.rank, backend.world_size),
            backend, loop_cfg,
            param_groups(objective, cfg.weight_decay,  # a frozen backbone has no layers to decay
                         lr_scale_fn=layer_decay_fn(model, cfg.layer_decay if protocol == "finetune" else 1.0)),
            callbacks=[*callbacks, *([scorer] if scorer is not None else [])],
        )
    history = sorted([*(scorer.records if scorer is not None else []), *fit_res.history], key=lambda r: r["step"])
    result = replace(
        _score(cfg, task, spec, loaded, data, backend, out_dir, seed, device, scorer), steps=fit_res.steps,
        seconds=round(time.perf_counter() - t0, 2),
        history=[{k: v for k, v in r.items() if math.isfinite(v)} for r in history],
        compute=_ledger(compute or ComputeCfg(), cfg, fit_res, meter, batch, backend, str(device)),
    )
    result = _write(result, backend)
    log.info("finetune %s on %s (seed %d): %s", spec.name, task.name, seed,
             ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if not k.startswith("iou_")))
    return result


def _objective(cfg: FinetuneCfg, task: TaskCfg, loaded: LoadedBackbone, data: _Data) -> tuple[Any, Any, str]:
    """``(task model, objective, protocol)``: a new head of the task's kind on the backbone, wrapped in the objective
    of the task's protocol with the recipe's batch mixing."""
    model = build_task_model(task.head, loaded.model, num_outputs=data.train.num_outputs,
                             decoder_dim=cfg.decoder_dim, decoder=task.decoder or cfg.decoder,
                             ignore_index=task.ignore_index, mean=loaded.mean, std=loaded.std)
    protocol = cfg.protocol_of(task)
    return model, build_objective(model, protocol, mix=batch_mix(cfg, task.head, data.train.num_outputs)), protocol


def _ledger(compute: ComputeCfg, cfg: FinetuneCfg, fit_res: Any, meter: dict[str, Any], batch: int, backend: Any,
            device: str) -> dict[str, Any]:
    """The run's compute ledger (:mod:`gfm_core.training.ledger`) as JSON: the steps this call trained."""
    from gfm_core.training.ledger import make_ledger

    return make_ledger(compute, wall_s=meter["wall_s"], steps=fit_res.steps - fit_res.start_step,
                       global_batch=batch * cfg.grad_accum * backend.world_size, flops_per_step=fit_res.flops_per_step,
                       device=device, world_size=backend.world_size, precision=cfg.precision,
                       energy=meter["energy"]).to_json()


def _headline(task: TaskCfg) -> str:
    return task.headline or get_head(task.head).headline


def _new_metrics(task: TaskCfg, data: _Data) -> TaskMetrics:
    return build_metrics(task.head, data.train.num_outputs, task.ignore_index)


def _eval_loader(cfg: FinetuneCfg, data: _Data) -> DataLoader:
    return DataLoader(data.test, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)


def _scores_meta(task: TaskCfg, spec: BackboneSpec, seed: int) -> dict[str, Any]:
    return {"task": task.name, "head": task.head, "model": spec.name, "seed": seed, "headline": _headline(task)}


def _score(cfg: FinetuneCfg, task: TaskCfg, spec: BackboneSpec, loaded: LoadedBackbone, data: _Data, backend: Any,
           out_dir: Path, seed: int, device: str, scorer: BestEpoch | None) -> FinetuneResult:
    """The trained objective's result: the test split scored now (rank 0 writes the per-sample scores), or the
    best val epoch ``scorer`` kept (``scoring: paper``; on rank 0, the other ranks read its result.json).

    Raises:
        ConfigError: the task's headline is not one of the head's metrics.
    """
    headline, best_step = _headline(task), None
    if scorer is None:
        values, ids, stats = evaluate_objective(backend.module, _eval_loader(cfg, data), _new_metrics(task, data),
                                                backend.device)
        if headline not in values:
            raise ConfigError(f"finetune.tasks[{task.name}].headline {headline!r} is not one of {sorted(values)}")
        if backend.is_main:
            save_scores(out_dir / SCORES_FILE, ids, stats, _scores_meta(task, spec, seed))
    elif backend.is_main:
        values, best_step = scorer.result()
    else:
        values = {}
    return FinetuneResult(
        task=task.name, head=task.head, model=spec.name, seed=seed, metrics=values, headline=headline, steps=0,
        train_samples=len(data.train), test_samples=len(data.test), seconds=0.0, device=device, out_dir=out_dir,
        result_json=out_dir / RESULT_FILE, scores=out_dir / SCORES_FILE,
        backbone={"kind": spec.kind, "arch": loaded.arch, "source": loaded.source, "sha256": loaded.sha256},
        label_fraction=task.label_fraction, protocol=cfg.protocol_of(task), scoring=cfg.scoring, best_step=best_step,
    )


def _write(result: FinetuneResult, backend: Any) -> FinetuneResult:
    """Rank 0 writes ``result.json`` (warning when it replaces one of another protocol or scoring); under
    ``scoring: paper`` the other ranks then read it (only rank 0 scored val)."""
    if backend.is_main:
        if result.result_json.is_file():
            try:
                before = load_result(result.result_json)
                if (before.protocol, before.scoring) != (result.protocol, result.scoring):
                    log.warning("%s: replacing a result of protocol %s, scoring %s with one of protocol %s, "
                                "scoring %s", result.result_json, before.protocol, before.scoring, result.protocol,
                                result.scoring)
            except CheckpointError:
                pass  # an unreadable old file is simply replaced
        write_json(result.result_json, result.to_json())
    backend.barrier()
    return result if backend.is_main or result.scoring != "paper" else load_result(result.result_json)


def _bind_start(path: Path, spec: BackboneSpec, sha: str, resume: bool) -> None:
    """Record the backbone a run starts from; a resumed run must continue from checkpoints of the same bytes.

    Raises:
        CheckpointError: resuming a run whose checkpoints started from other (or unrecorded) backbone bytes.
    """
    if resume and (path.parent / "checkpoints").is_dir():
        before = read_json(path).get("sha256") if path.is_file() else None
        if before != sha:
            raise CheckpointError(
                f"{path}: the checkpoints of this run started from backbone sha256 {before or 'unrecorded'}, "
                f"{spec.path or spec.name} is now {sha}; re-run `gfm finetune --model {spec.name}` without resume"
            )
        return
    write_json(path, {"model": spec.name, "kind": spec.kind, "sha256": sha, "source": str(spec.path or "random")})


# ------------------------------------------------------------------------------------------------ stage API


def log_runs(runs: Sequence[FinetuneResult]) -> None:
    """Log fine-tuning runs to the active MLflow run: each run's curve by step and its test metrics, named
    ``<model>.seed<seed>.<metric>``, and its ``result.json`` under ``<model>/seed_<seed>``."""
    from gfm_core import tracking

    for r in runs:
        tag = f"{r.model}.seed{r.seed}."
        for h in r.history:
            tracking.log_metrics({f"{tag}{k}": v for k, v in h.items() if k != "step"}, step=int(h["step"]))
        tracking.log_metrics({f"{tag}{k}": v for k, v in r.metrics.items()})
        tracking.log_metrics({f"{tag}compute.{k}": float(v) for k, v in r.compute.items()
                              if isinstance(v, int | float) and not isinstance(v, bool)})
        tracking.log_artifacts({"result": r.result_json}, f"{r.model}/seed_{r.seed}")


def run_finetune_task(
    params: Params,
    task: str,
    model_name: str,
    seed: int | None = None,
    *,
    max_steps: int | None = None,
    resume: bool = False,
) -> FinetuneResult:
    """Stage entry point: fine-tune one model on one task for one seed (default: the first of seeds)."""
    cfg = params.finetune
    seed = cfg.seeds[0] if seed is None else seed
    return finetune(
        cfg,
        params.task(task),
        distilled_teacher(params.model(model_name)),  # the ImageNet baseline: the teacher of the export
        seed=seed,
        out_dir=result_dir(cfg, task, model_name, seed),
        max_steps=max_steps,
        resume=resume,
        compute=params.compute,
    )


def run_finetune(
    params: Params,
    *,
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[FinetuneResult]:
    """Every (task, model, seed) of the params (or the given subsets), in that order."""
    cfg = params.finetune
    task_names = list(tasks) if tasks else [t.name for t in cfg.tasks]
    model_names = list(models) if models else [m.name for m in cfg.models]
    for name in task_names:
        params.task(name)
    for name in model_names:
        params.model(name)
    return [
        run_finetune_task(params, t, m, s)
        for t in task_names
        for m in model_names
        for s in (seeds or cfg.seeds)
    ]
