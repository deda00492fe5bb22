"""The pretraining stage: GFM teacher-student continual pretraining on the validated pile's shards.

:func:`run_pretrain` (the foundation model, or one of ``pretrain.ablations`` into its own folder) builds the
objective (:mod:`gfm_core.objectives`), the view stream
(:mod:`gfm_core.data.pretrain.stream`, with the optional teacher pool), the held-out probe
(:mod:`gfm_core.evaluation.holdout`) and the loop settings, runs :func:`gfm_core.training.loop.fit`, and exports
the student backbone with its provenance.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gfm_core.config import Params, PretrainCfg
from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.io import atomic_write, sha256_file, sha256_json, write_json

if TYPE_CHECKING:
    from gfm_core.training.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    """What pretraining produced."""

    steps: int
    metrics: dict[str, float]
    backbone: Path  # student encoder, safetensors (+ .json sidecar)
    checkpoint_dir: Path
    metrics_csv: Path
    summary_json: Path
    device: str
    images: int  # images in the pile
    history: list[dict[str, float]] = field(default_factory=list)
    reconstructions: Path | None = None  # PNG: input | masked | prediction | visible + prediction
    start_step: int = 0  # 0 = a fresh run; k = continued an interrupted run of the same fingerprint after step k
    start_reason: str = ""  # why it resumed or started fresh
    set_aside: Path | None = None  # where a fresh start moved the earlier run's checkpoints
    ledger: Ledger | None = None  # what this call's training cost (gfm_core.training.ledger)

    def tracked_metrics(self) -> dict[str, float]:
        """What the stage logs at its end (per-step metrics go to MLflow while it trains): the compute ledger."""
        return self.ledger.metrics() if self.ledger is not None else {}

    def tracked_files(self) -> dict[str, Path]:
        """The files the stage's tracked run keeps."""
        return pretrain_artifacts(self.backbone.parent)

    def summary(self) -> str:
        """One line of the final loss parts."""
        keys = ("loss", "mim", "distill", "cosine")
        return ", ".join(f"{k}={self.metrics[k]:.4f}" for k in keys if k in self.metrics)


def pretrain_artifacts(out_dir: Path) -> dict[str, Path]:
    """The files a pretraining's tracked run keeps (whoever launched it): summary, curves, pictures, sidecar."""
    return {"summary": out_dir / "summary.json", "metrics": out_dir / "metrics.csv",
            "sidecar": out_dir / "backbone.json", "reconstructions": out_dir / "reconstructions.png",
            "learning": out_dir / "learning.png"}


class _CsvLog:
    """Callback: mirror logged metrics into a CSV (DVC plots) as they arrive (``metrics.jsonl`` is the record:
    a fresh start moves it aside with the checkpoints and starts the CSV anew)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_start(self, step: int) -> None:
        """Keep only the rows up to the step this run starts from (rows past a resumed checkpoint were lost)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0], *(r for r in rows[1:] if r and int(r[0]) <= step)] if rows else []
        if len(kept) <= 1:
            self.path.unlink()
        else:
            with atomic_write(self.path, "w") as f:
                csv.writer(f, lineterminator="\n").writerows(kept)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


_RUN_NEUTRAL = ("out_dir", "log_every", "checkpoint_every", "num_workers", "ablations")


def pretrain_fingerprint(cfg: PretrainCfg, data_hash: str, total_steps: int) -> dict[str, str]:
    """What a pretraining run is: its data's content hash, its settings' sha256 (with the optimizer steps its
    schedule spans) and its teacher file's sha256.

    A checkpoint is continued only by a run with the same fingerprint. Settings that do not change the result
    (``out_dir``, ``log_every``, ``checkpoint_every``, ``num_workers``, the other ``ablations``) and the teacher's
    path (its bytes count, through the sha256) are left out.
    """
    section = cfg.model_dump(mode="json")
    for key in _RUN_NEUTRAL:
        section.pop(key, None)
    section["teacher"].pop("checkpoint", None)
    section["total_steps"] = total_steps  # max_steps may come from the caller, not from params
    teacher = cfg.teacher.checkpoint
    return {
        "data": data_hash,
        "params_sha256": sha256_json(section),
        "teacher_sha256": sha256_file(teacher) if cfg.alpha > 0 and teacher is not None else "none",
    }


def _tracking_callbacks(params: Params, is_main: bool) -> list[Any]:
    """Per-step MLflow metrics when a tracked run is active (rank 0 only)."""
    if not (params.tracking.enabled and is_main):
        return []
    from gfm_core import tracking

    return tracking.callbacks()


def ablation_params(params: Params, ablation: str | None) -> Params:
    """``params`` whose ``pretrain`` section is that of the ablation (``None``: ``params`` itself).

    Raises:
        ConfigError: unknown ablation, or overrides that are not valid settings.
    """
    if ablation is None:
        return params
    return params.model_copy(update={"pretrain": params.pretrain.ablation(ablation)})


def run_pretrain(
    params: Params,
    ablation: str | None = None,
    *,
    resume: bool | Literal["unfinished"] = False,
    max_steps: int | None = None,
    callbacks: Sequence[Any] = (),
    export_steps: Sequence[int] = (),
) -> PretrainResult:
    """GFM teacher-student continual pretraining on the pile's shards, then export the student backbone.

    ``ablation``: run ``pretrain.ablations[ablation]`` instead, into its own folder (:func:`ablation_params`).

    ``export_steps``: also export the student after these steps, as ``backbone_step<NNNNNN>.safetensors``
    (learning curves; not under ZeRO-3, whose ranks hold shards of the weights).

    The schedule spans ``epochs`` over the pile (warm-up ``warmup_epochs``); ``max_steps`` (argument, else
    ``pretrain.max_steps``) compresses the same schedule into that many optimizer steps. Learning is measured on
    held-out views at every logged step (:mod:`gfm_core.evaluation.holdout`) and summarised in ``summary.json``.

    ``resume``: ``True`` continues the newest checkpoint in ``pretrain.out_dir`` when it has this run's
    :func:`pretrain_fingerprint` (same data, settings and teacher); ``"unfinished"`` continues only an
    interrupted one (a finished run starts over: what a Dagster re-materialisation wants); ``False`` starts
    fresh. A fresh start moves the earlier run's checkpoints to ``checkpoints.stale-<time>/`` (never deletes
    them); the result's ``start_step``/``start_reason``/``set_aside`` say what happened.

    Raises:
        CheckpointError: another pretraining is writing ``pretrain.out_dir`` (rank 0 holds its lock file).
    """
    from gfm_core.training.checkpoint import exclusive_out_dir

    params = ablation_params(params, ablation)
    lock = exclusive_out_dir(params.pretrain.out_dir) if os.environ.get("RANK", "0") == "0" else nullcontext()
    with lock:
        return _run_pretrain(params, resume=resume, max_steps=max_steps, callbacks=callbacks,
                             export_steps=export_steps)


def _run_pretrain(
    params: Params, *, resume: bool | Literal["unfinished"], max_steps: int | None, callbacks: Sequence[Any],
    export_steps: Sequence[int],
) -> PretrainResult:
    from gfm_core.evaluation.holdout import plot_learning
    from gfm_core.objectives.pretrain import build_continual_pretrain, export_backbone
    from gfm_core.training.backends import auto_device
    from gfm_core.training.callbacks import CollapseWarning
    from gfm_core.training.checkpoint import seed_everything
    from gfm_core.training.ledger import make_ledger, metered
    from gfm_core.training.loop import fit
    from gfm_core.training.optim import param_groups
    from gfm_core.training.setup import loader_factory, make_backend, with_effective_precision

    device = auto_device(params.pretrain.device)
    params = params.model_copy(update={"pretrain": with_effective_precision(params.pretrain, device)})
    cfg = params.pretrain
    out_dir = cfg.out_dir
    seed_everything(cfg.seed)
    backend = make_backend(cfg, device, cfg.batch_size)
    objective = build_continual_pretrain(cfg)
    stream = pretrain_stream(params, objective, device)
    probe = _holdout_probe(cfg, backend, objective, stream)
    loop_cfg, steps_per_epoch = _pretrain_loop_cfg(params, len(stream), backend.world_size, resume, max_steps,
                                                   stream.content_hash)
    loader = loader_factory(stream, cfg.batch_size, cfg.num_workers, cfg.seed, backend.rank, backend.world_size)
    log.info(
        "pretraining %s <- %s on %d views/epoch (%d steps/epoch, %d steps, %s/%s on %s, lr %.3g)",
        cfg.student.arch, cfg.teacher.arch if cfg.alpha > 0 else "no teacher", len(stream), steps_per_epoch,
        loop_cfg.total_steps, cfg.backend, cfg.precision, device, loop_cfg.base_lr,
    )
    csv_log = _CsvLog(out_dir / "metrics.csv") if backend.is_main else None
    exports = _ExportAt(objective, export_steps, out_dir, lambda: _backbone_meta(cfg, stream, None))
    if export_steps and getattr(backend, "zero_stage", 0) == 3:
        raise ConfigError("export_steps needs whole weights on rank 0: use zero_stage <= 2")
    with metered(device, backend.world_size) as meter:
        fit_res = fit(
            objective, loader, backend, loop_cfg, param_groups(objective, cfg.weight_decay),
            callbacks=[*([csv_log] if csv_log else []), *([probe] if probe else []), exports, *callbacks,
                       *_tracking_callbacks(params, backend.is_main), CollapseWarning(threshold=1e-4)],
        )
    elapsed = meter["wall_s"]
    ledger = make_ledger(params.compute, wall_s=elapsed, steps=fit_res.steps - fit_res.start_step,
                         global_batch=cfg.batch_size * cfg.grad_accum * backend.world_size, device=device,
                         flops_per_step=fit_res.flops_per_step, world_size=backend.world_size, precision=cfg.precision,
                         energy=meter["energy"], pool=stream.pool and stream.pool.cost,
                         recompute=cfg.grad_checkpointing)

    backbone, summary = out_dir / "backbone.safetensors", out_dir / "summary.json"
    weights = backend.state_dict()  # collective under ZeRO-3 (gathers the shards): every rank calls it
    recon = None
    if backend.is_main:
        export_backbone(backend.module, backbone, _backbone_meta(cfg, stream, fit_res), state_dict=weights)
        start = {f"{k}_start": v for k, v in (probe.start if probe else {}).items() if "trivial" not in k}
        write_json(summary, {
            "steps": fit_res.steps, "views_per_epoch": len(stream), "train_images": len(stream.train_images),
            "holdout_images": len(stream.held_out), "device": device, "backend": cfg.backend,
            "precision": cfg.precision, "peak_lr": loop_cfg.base_lr, "teacher_pool": cfg.teacher_pool if
            stream.pool is not None else None, "seconds": round(elapsed, 2), **fit_res.metrics, **start,
            **learning_margins(fit_res.metrics),
            "start_step": fit_res.start_step, "start_reason": fit_res.start_reason,
            "set_aside": str(fit_res.set_aside) if fit_res.set_aside else None,
            "fingerprint": loop_cfg.fingerprint, "compute": ledger.to_json(),
        })
        if probe is not None:
            recon = probe.save_reconstructions(out_dir / "reconstructions.png")
            plot_learning(out_dir / "metrics.jsonl", probe.start, out_dir / "learning.png")
    backend.barrier()
    return PretrainResult(
        steps=fit_res.steps, metrics=dict(fit_res.metrics), backbone=backbone,
        checkpoint_dir=out_dir / "checkpoints", metrics_csv=out_dir / "metrics.csv", summary_json=summary,
        device=device, images=len(stream.train_images), history=list(fit_res.history), reconstructions=recon,
        start_step=fit_res.start_step, start_reason=fit_res.start_reason, set_aside=fit_res.set_aside,
        ledger=ledger,
    )


class _ExportAt:
    """Callback: export the student backbone after each of ``steps`` (rank 0)."""

    def __init__(self, objective: Any, steps: Sequence[int], out_dir: Path, meta: Any) -> None:
        self.objective, self.steps, self.out_dir, self.meta = objective, set(steps), out_dir, meta

    def on_step_end(self, step: int) -> None:
        if step in self.steps:
            from gfm_core.objectives.pretrain import export_backbone

            export_backbone(self.objective, self.out_dir / f"backbone_step{step:06d}.safetensors",
                            {**self.meta(), "steps": step})


def pretrain_stream(params: Params, objective: Any, device: str) -> Any:
    """The training stream over the validated pile's shards, with the teacher pool when configured.

    Raises:
        ConfigError: no shards yet (run ``gfm shards``).
    """
    import torch

    from gfm_core.data.ingest.verdicts import require_verdicts
    from gfm_core.data.pretrain.masking import MaskGenerator
    from gfm_core.data.pretrain.stream import PretrainStream
    from gfm_core.data.pretrain.teacher_pool import load_or_build_pool, pool_key

    cfg = params.pretrain
    shard_dir = params.ingest.out_dir / "shards"
    judged = require_verdicts(params.ingest.out_dir)  # pretraining reads only a pile that passed its gates
    if not (shard_dir / "index.json").is_file():
        raise ConfigError(f"{shard_dir}: no training shards; run `gfm shards` first")
    mask = MaskGenerator(cfg.student.img_size, cfg.mask_patch_size, cfg.student.patch_size, cfg.mask_ratio)
    stream = PretrainStream(
        shard_dir, cfg.student.img_size, mask, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
        mean=objective.mean, std=objective.std, seed=cfg.seed, samples_per_epoch=cfg.samples_per_epoch,
        source_weights=cfg.source_weights, holdout_fraction=cfg.holdout_fraction,
    )
    if stream.content_hash != judged["manifest_content_hash"]:
        raise DataValidationError(
            f"{shard_dir}: the shards hold pile {stream.content_hash[:12]} but the validated manifest is "
            f"{judged['manifest_content_hash'][:12]}; run `gfm shards`"
        )
    if cfg.teacher_pool:  # every variant (MIM-only too) reads the same pool: the same views, fresh masks
        from gfm_core.models.backbones import create_teacher

        teacher = (objective.teacher if objective.teacher is not None else create_teacher(cfg.teacher)).to(device)
        ident = _teacher_identity(cfg)
        key = pool_key(stream, cfg.teacher_pool, cfg.teacher_pool_seed, ident)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

        def targets(views: Any) -> Any:  # as the live teacher computes them: under the run's autocast
            with torch.autocast(torch.device(device).type, dtype=half or torch.float32, enabled=half is not None):
                return teacher(teacher.preprocess(views.to(device), objective.mean, objective.std))

        stream.pool = load_or_build_pool(
            stream, targets, params.ingest.out_dir / "teacher_pools" / f"pool-{key[:16]}.safetensors",
            size=cfg.teacher_pool, seed=cfg.teacher_pool_seed, teacher_id=ident,
        )
    return stream


def _teacher_identity(cfg: PretrainCfg) -> dict[str, Any]:
    """What a teacher target depends on besides the view: the weights' sha256 and the teacher geometry."""
    return {"arch": cfg.teacher.arch, "sha256": sha256_file(cfg.teacher.checkpoint) if cfg.teacher.checkpoint
            else None, "img_size": cfg.teacher.img_size, "stage": cfg.teacher.feature_stage,
            "timm_kwargs": cfg.teacher.timm_kwargs, "precision": cfg.precision}


def _holdout_probe(cfg: PretrainCfg, backend: Any, objective: Any, stream: Any) -> Any:
    """The held-out probe (rank 0; none without held-out images or under ZeRO-3's sharded weights)."""
    if not backend.is_main or cfg.holdout_fraction == 0 or getattr(backend, "zero_stage", 0) == 3:
        return None
    import torch

    from gfm_core.evaluation.holdout import HoldoutProbe

    samples = stream.holdout_samples(cfg.holdout_crops)
    targets = None
    if cfg.alpha > 0:
        with torch.no_grad():
            targets = torch.cat([objective.teacher_targets(samples["image"][s : s + 128]).float().cpu()
                                 for s in range(0, cfg.holdout_crops, 128)])
    probe = HoldoutProbe(objective, samples, targets)
    probe.begin()
    return probe


def _pretrain_loop_cfg(
    params: Params, views: int, world: int, resume: bool | Literal["unfinished"], max_steps: int | None,
    data_hash: str,
) -> tuple[Any, int]:
    """The fit() settings of a pretraining: schedule in steps, learning rates after ``lr_scaling``, and the run's
    fingerprint (``data_hash``: the pile's content hash)."""
    from gfm_core.training.loop import LoopCfg
    from gfm_core.training.setup import schedule

    cfg = params.pretrain
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = views // world // cfg.batch_size // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"pretrain.batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} rank(s) = {global_batch} "
            f"exceeds the {views} views per epoch of the pile under {params.ingest.root} (set samples_per_epoch)"
        )
    plan = schedule(cfg, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, limit=max_steps or cfg.max_steps,
                    global_batch=global_batch)
    loop_cfg = LoopCfg(
        **plan, out_dir=cfg.out_dir, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, resume=resume,
        fingerprint=pretrain_fingerprint(cfg, data_hash, plan["total_steps"]),
    )
    return loop_cfg, steps_per_epoch


def _backbone_meta(cfg: PretrainCfg, stream: Any, fit_res: Any | None) -> dict[str, Any]:
    """The exported backbone's provenance: teacher, params hash, data, steps and final losses."""
    teacher_meta: dict[str, Any] = {"arch": cfg.teacher.arch, "feature_stage": cfg.teacher.feature_stage}
    if cfg.alpha > 0 and cfg.teacher.checkpoint is not None:
        teacher_meta["sha256"] = sha256_file(cfg.teacher.checkpoint)
        teacher_meta["file"] = str(cfg.teacher.checkpoint)
    return {
        "teacher": teacher_meta,
        "params_sha256": sha256_json(cfg.model_dump(mode="json", exclude={"ablations"})),
        "data": {"shards": stream.generation, "manifest_content_hash": stream.content_hash,
                 "images": len(stream.train_images), "holdout_images": len(stream.held_out)},
        **({"steps": fit_res.steps, "loss": {k: v for k, v in fit_res.metrics.items() if math.isfinite(v)}}
           if fit_res is not None else {}),
    }


def learning_margins(metrics: dict[str, float]) -> dict[str, float]:
    """``mim_ratio_holdout`` (student / trivial masked L1) and ``cos_margin_holdout`` (student - mean vector)."""
    out = {}
    if metrics.get("mim_trivial_holdout"):
        out["mim_ratio_holdout"] = metrics["mim_holdout"] / metrics["mim_trivial_holdout"]
    if "cos_holdout" in metrics and "cos_mean_vector_holdout" in metrics:
        out["cos_margin_holdout"] = metrics["cos_holdout"] - metrics["cos_mean_vector_holdout"]
    return out


