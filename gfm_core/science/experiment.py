"""The science experiment: pretraining variants x seeds, frozen dense probes, and the paper's claims tested.

:func:`run_science` (``gfm science``, ``make science``, the DVC stage ``science`` and the Dagster job
``gfm_science``) does, with the active params (preset ``science``):

1. the pile: ``gfm ingest``, ``validate``, ``shards`` (the science preset's pile leaves its evaluation scenes
   out);
2. every variant (GFM and ``pretrain.ablations``: MIM-only, distill-only) for every seed, ``science.steps``
   optimizer steps each, with the same initialisation, crops and masks within a seed (common random numbers),
   exporting the student at ``science.curve_fractions`` of the budget; random init is the initial student;
3. dense linear probes (:mod:`gfm_core.science.probes`) of every backbone, raw pixels and the teacher itself on
   every evaluation set; relevance of the teacher, measured image-disjoint where a set has several images; and,
   secondary, kNN and logistic tile-level probes of the same blocks (:mod:`gfm_core.science.tiles`);
4. the statistics (:mod:`gfm_core.science.stats`) and the report (:mod:`gfm_core.science.report`).

Runs whose exported backbone already matches their pretraining settings are reused, so a second call only
re-scores (the probes and the statistics are cheap next to pretraining).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from gfm_core.config import Params
from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.io import read_json, sha256_json, write_json
from gfm_core.science.probes import (
    DenseSet,
    Encoder,
    cross_validate,
    encoder_features,
    load_dense_set,
    raw_features,
    with_image_identity,
)
from gfm_core.science.stats import BlockCounts
from gfm_core.science.tiles import PROBES, block_labels, raw_tile_features, tile_cross_validate, tile_features

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One pretraining: variant, seed, the exported backbone at each curve fraction, and its cost."""

    variant: str
    seed: int
    backbones: dict[float, Path]
    steps: int
    step_flops: float = 0.0
    fixed_flops: float = 0.0  # the teacher pool's forward passes (once per run that needs targets)
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def flops_at(self, fraction: float) -> float:
        """Cumulative training FLOPs at ``fraction`` of the step budget."""
        return self.fixed_flops + fraction * self.steps * self.step_flops


def _data_identity(params: Params) -> dict[str, Any]:
    """What a finished run's reuse depends on besides its settings: the shards (pile and stretch) and teacher bytes."""
    from gfm_core.data.ingest.shards import load_shard_index
    from gfm_core.io import sha256_file

    index = load_shard_index(params.ingest.out_dir / "shards")
    teacher = params.pretrain.teacher.checkpoint
    return {"shards": [s["file"] for s in index["shards"]], "manifest": index["manifest_content_hash"],
            "teacher_sha256": sha256_file(teacher) if teacher is not None and Path(teacher).is_file() else None}


def variant_params(params: Params, variant: str, seed: int) -> Params:
    """The params of one pretraining of the experiment (variant overrides, seed, its own folder)."""
    from gfm_core.config import parse_params

    cfg = params.science
    raw = params.model_dump(mode="json", by_alias=True)
    raw["pretrain"].update({**params.science_variants()[variant], "seed": seed,
                            "out_dir": str(cfg.out_dir / "runs" / variant / f"seed{seed}")})
    raw["preset"] = None
    return parse_params(raw, source=f"science variant {variant} seed {seed}")


def pretrain_runs(params: Params) -> list[Run]:
    """Every (variant, seed) pretraining, reusing a finished run whose settings are unchanged."""
    from gfm_core import stages

    cfg = params.science
    export = sorted({max(1, round(f * cfg.steps)) for f in cfg.curve_fractions})
    data_identity = _data_identity(params)
    runs = []
    for seed in cfg.seeds:
        for variant in params.science_variants():
            p = variant_params(params, variant, seed)
            out = p.pretrain.out_dir
            paths = {f: out / f"backbone_step{max(1, round(f * cfg.steps)):06d}.safetensors"
                     for f in cfg.curve_fractions}
            key = sha256_json({"pretrain": p.pretrain.model_dump(mode="json"), "steps": cfg.steps, "export": export,
                               "data": data_identity})
            stamp = out / "science_run.json"
            if not (stamp.is_file() and read_json(stamp).get("key") == key
                    and all(x.is_file() for x in paths.values())):
                t0 = time.perf_counter()
                stages.run_pretrain(p, max_steps=cfg.steps, export_steps=export)
                write_json(stamp, {"key": key, "seconds": time.perf_counter() - t0})
            summary = json.loads((out / "summary.json").read_text())
            if summary["steps"] != cfg.steps:
                raise ConfigError(
                    f"science.steps {cfg.steps}: the pretraining schedule of {variant} ran {summary['steps']} steps "
                    f"(pretrain.epochs x steps per epoch is shorter); raise pretrain.epochs"
                )
            runs.append(Run(variant, seed, paths, cfg.steps, seconds=read_json(stamp)["seconds"],
                            summary=summary))
    return runs


# ----------------------------------------------------------------------------------------------- encoders


def timm_encoder(model: torch.nn.Module, levels: tuple[int, ...]) -> Encoder:
    """The frozen timm model's feature maps at ``levels`` (0-based, ``forward_intermediates``)."""
    model.eval()

    def encode(x: torch.Tensor) -> list[torch.Tensor]:
        return list(cast(Any, model).forward_intermediates(x, indices=list(levels), intermediates_only=True))

    return encode


def teacher_encoder(params: Params) -> Encoder:
    """The frozen ImageNet teacher's maps at ``science.teacher_levels``, fed as in pretraining (resized)."""
    from gfm_core.models.backbones import create_teacher, teacher_inputs

    teacher = create_teacher(params.pretrain.teacher)
    mean, std = student_norm(params)
    inner = timm_encoder(teacher.model, params.science.teacher_levels)

    def encode(x: torch.Tensor) -> list[torch.Tensor]:
        return inner(teacher_inputs(x, teacher.input_size, src_mean=mean, src_std=std, dst_mean=teacher.mean,
                                    dst_std=teacher.std))

    return encode


def student_norm(params: Params) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The student's input normalisation: its arch's pretrained mean/std, as pretraining uses."""
    import timm

    # None (an unknown arch) fails here as before, on the attribute access
    pcfg = cast(timm.models.PretrainedCfg, timm.models.get_pretrained_cfg(params.pretrain.student.arch))
    return tuple(pcfg.mean), tuple(pcfg.std)


def random_init(params: Params, seed: int) -> torch.nn.Module:
    """The student encoder exactly as pretraining with ``seed`` initialises it (before any step)."""
    from gfm_core.models.backbones import create_student
    from gfm_core.training.checkpoint import seed_everything

    seed_everything(seed)
    return create_student(params.pretrain.student)


# ------------------------------------------------------------------------------------------------- probes


@dataclass
class Scores:
    """Block counts per (set, model, seed, fraction), the relevance and sensitivity runs, the tile probes."""

    main: dict[tuple[str, str, int, float], BlockCounts] = field(default_factory=dict)
    relevance: dict[tuple[str, str, int], BlockCounts] = field(default_factory=dict)
    identity: dict[tuple[str, str, int], BlockCounts] = field(default_factory=dict)
    tiles: dict[str, dict[tuple[str, str, int], BlockCounts]] = field(default_factory=dict)  # probe -> counts


FIXED = -1  # the "seed" of models without one (raw pixels, the teacher)
CURVE = ("gfm", "mim_only")  # the variants H4 follows through training


def probe_everything(params: Params, runs: list[Run], sets: list[DenseSet]) -> Scores:
    """Features and cross-validated probes of every model on every set (module docstring, step 3)."""
    from gfm_core.models.weights import load_backbone

    cfg = params.science
    tile = params.pretrain.student.img_size
    mean, std = student_norm(params)
    kw: dict[str, Any] = dict(weight_decay=cfg.probe_weight_decay, iters=cfg.probe_iters)
    teacher = teacher_encoder(params)
    scores = Scores()
    for ds in sets:
        log.info("science: probing %s (%d images, %d blocks, %d pixels)", ds.name, len(ds.images),
                 len(ds.block_image), len(ds.px_label))
        labels = block_labels(ds)

        def tiles(name: str, seed: int, feats: np.ndarray | None, ds: DenseSet = ds, labels: np.ndarray = labels,
                  ) -> None:  # feats None: the training folds' majority
            for probe in PROBES:
                scores.tiles.setdefault(probe, {})[(ds.name, name, seed)] = tile_cross_validate(
                    feats, ds, labels, probe if feats is not None else "majority", **kw)

        _score(scores, ds, "majority", FIXED, 1.0, np.zeros((len(ds.px_label), 1), np.float32), **kw)  # priors only
        tiles("majority", FIXED, None)
        _score(scores, ds, "raw", FIXED, 1.0, raw_features(ds), relevance=True, identity=True, **kw)
        tiles("raw", FIXED, raw_tile_features(ds))
        _score(scores, ds, "teacher", FIXED, 1.0, encoder_features(teacher, ds, tile, mean, std), relevance=True,
               identity=True, **kw)
        tiles("teacher", FIXED, tile_features(teacher, ds, tile, mean, std))
        for seed in cfg.seeds:
            enc = timm_encoder(random_init(params, seed), cfg.student_levels)
            _score(scores, ds, "random", seed, 1.0, encoder_features(enc, ds, tile, mean, std), identity=True, **kw)
            tiles("random", seed, tile_features(enc, ds, tile, mean, std))
        for run in runs:
            for frac, path in run.backbones.items():
                final = frac == 1.0
                if not final and run.variant not in CURVE:  # only H4's curve needs the earlier exports
                    continue
                enc = timm_encoder(load_backbone(path), cfg.student_levels)
                _score(scores, ds, run.variant, run.seed, frac, encoder_features(enc, ds, tile, mean, std),
                       relevance=final and run.variant == "mim_only", identity=final, **kw)
                if final:
                    tiles(run.variant, run.seed, tile_features(enc, ds, tile, mean, std))
    return scores


def _score(
    scores: Scores, ds: DenseSet, name: str, seed: int, frac: float, feats: np.ndarray, *, relevance: bool = False,
    identity: bool = False, **kw: Any,
) -> None:
    """Block-CV counts of one model's features; the relevance (image-disjoint) and identity variants on demand."""
    several = len(ds.images) > 1
    scores.main[(ds.name, name, seed, frac)] = cross_validate(feats, ds, **kw)
    if relevance:
        scores.relevance[(ds.name, name, seed)] = cross_validate(feats, ds, by="images" if several else "blocks",
                                                                 **kw)
    if identity and several:
        scores.identity[(ds.name, name, seed)] = cross_validate(with_image_identity(feats, ds), ds, **kw)


def measure_flops(params: Params, runs: list[Run]) -> None:
    """Fill each run's FLOPs per optimizer step (student forward + backward) and fixed cost (teacher pool).

    Counted once per set of variant settings (``<out_dir>/flops.json``).
    """
    cfg = params.pretrain
    b, s = cfg.batch_size, cfg.student.img_size
    cache = params.science.out_dir / "flops.json"
    key = sha256_json({v: variant_params(params, v, 0).pretrain.model_dump(mode="json", exclude={"seed", "out_dir"})
                       for v in params.science_variants()})
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if known.get("key") == key:
        per_step, per_view = known["per_step"], known["per_view"]
    else:
        per_step, per_view = _count_flops(params, b, s)
        write_json(cache, {"key": key, "per_step": per_step, "per_view": per_view})
    for run in runs:
        run.step_flops = per_step[run.variant]
        needs_teacher = params.science_variants()[run.variant].get("alpha", cfg.alpha) > 0
        run.fixed_flops = per_view * (cfg.teacher_pool or 0) if needs_teacher else 0.0
        if needs_teacher and not cfg.teacher_pool:  # a live teacher runs on every view of every step
            run.step_flops += per_view * b


def _count_flops(params: Params, b: int, s: int) -> tuple[dict[str, float], float]:
    """FLOPs of one training step of each variant, and of the teacher on one view (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from gfm_core.data.pretrain.masking import MaskGenerator
    from gfm_core.models.backbones import create_teacher
    from gfm_core.objectives import build_continual_pretrain

    gen = torch.Generator().manual_seed(0)
    per_step: dict[str, float] = {}
    for variant in params.science_variants():
        p = variant_params(params, variant, 0).pretrain
        obj = build_continual_pretrain(p)
        masks = MaskGenerator(s, p.mask_patch_size, p.student.patch_size, p.mask_ratio)
        mask = torch.stack([masks(gen) for _ in range(b)])
        batch: dict[str, torch.Tensor] = {"image": torch.randn(b, 3, s, s, generator=gen), "mask": mask}
        if obj.teacher is not None:  # the student's step alone; the teacher's forward is counted per view below
            batch["teacher_target"] = torch.randn(b, obj.teacher.feature_dim, generator=gen)
        with FlopCounterMode(display=False) as counter:
            obj(batch)["loss"].backward()
        per_step[variant] = float(counter.get_total_flops())
    teacher = create_teacher(params.pretrain.teacher)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(torch.randn(1, 3, *teacher.input_size))
    return per_step, float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ScienceResult:
    """Where the report is and what it concluded."""

    report_json: Path
    report_md: Path
    verdicts: dict[str, dict[str, str]]
    seconds: float


def run_science(params: Params, *, progress: Callable[[str], None] | None = None) -> ScienceResult:
    """The whole experiment (module docstring); returns the verdict of every hypothesis on every set.

    Raises:
        DataValidationError: the pile fails validation, or an evaluation set is unusable.
    """
    from gfm_core import stages
    from gfm_core.science.report import analyse, write_report

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    cfg = params.science
    if not cfg.eval_sets:
        raise DataValidationError("science.eval_sets is empty: add a densely labelled set to score the models on")
    stages.run_ingest(params, progress=False)
    val = stages.run_validate(params)
    if not val.success:
        raise DataValidationError(val.summary)
    stages.run_shards(params, progress=False)
    say("[science] pile ready")
    t_pre = time.perf_counter()
    runs = pretrain_runs(params)
    measure_flops(params, runs)
    say(f"[science] {len(runs)} pretrainings ready ({time.perf_counter() - t_pre:.0f} s)")
    t_probe = time.perf_counter()
    tile = params.pretrain.student.img_size
    for e in cfg.eval_sets:
        if e.block_size % tile:
            raise ConfigError(
                f"science.eval_sets[{e.name}].block_size {e.block_size}: must be a multiple of the student's input "
                f"size {tile} (features are computed per {tile} px tile; a block edge inside a tile would let "
                f"training pixels share inputs with test pixels)"
            )
    sets = [load_dense_set(e, cfg.folds, cfg.seed) for e in cfg.eval_sets]
    scores = probe_everything(params, runs, sets)
    say(f"[science] probes done ({time.perf_counter() - t_probe:.0f} s)")
    report = analyse(params, runs, sets, scores)
    report["wall_seconds"] = {"total": round(time.perf_counter() - t0, 1),
                              "pretraining_this_call": round(t_probe - t_pre, 1),
                              "probes": round(time.perf_counter() - t_probe, 1),
                              "pretraining_runs": round(sum(r.seconds for r in runs), 1)}
    paths = write_report(report, cfg.out_dir)
    verdicts = {h: {s: v["verdict"] for s, v in body["sets"].items()} for h, body in report["hypotheses"].items()}
    return ScienceResult(paths["json"], paths["markdown"], verdicts, time.perf_counter() - t0)
