"""One function per pipeline stage. The CLI, Dagster assets, DVC stages and tests all call these.

Each takes the validated :class:`~gfm_core.config.Params` and returns a frozen result dataclass of paths and
numbers; none of them knows who called it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfm_core.config import Params
from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.io import sha256_file, write_json
from gfm_core.pretraining import (  # the pretraining stage, in its own module (re-exported here)
    PretrainResult as PretrainResult,
)
from gfm_core.pretraining import learning_margins as learning_margins
from gfm_core.pretraining import make_backend as make_backend
from gfm_core.pretraining import pretrain_fingerprint as pretrain_fingerprint
from gfm_core.pretraining import pretrain_stream as pretrain_stream
from gfm_core.pretraining import run_pretrain as run_pretrain

log = logging.getLogger(__name__)

TEACHER_FILE = "tf_efficientnet_lite0.safetensors"


# ------------------------------------------------------------------------------------------------ demo data


@dataclass(frozen=True)
class DemoDataStageResult:
    """Demo data plus the demo teacher's weight file."""

    root: Path
    teacher: Path
    pile_counts: dict[str, int]
    task_counts: dict[str, dict[str, int]]


def run_demo_data(params: Params) -> DemoDataStageResult:
    """Build the embedded demo GeoPile and tasks, and export the real ImageNet demo teacher next to them."""
    from gfm_core.demo.build import build_demo_data
    from gfm_core.models.imagenet_weights import export_efficientnet_lite0

    res = build_demo_data(params.demo_data)
    teacher = export_efficientnet_lite0(params.demo_data.root / "teacher" / TEACHER_FILE)
    return DemoDataStageResult(
        root=res.root, teacher=teacher, pile_counts=dict(res.pile_counts), task_counts=dict(res.task_counts)
    )


# ------------------------------------------------------------------------------------------------ ingestion


@dataclass(frozen=True)
class IngestResult:
    """The pile's manifest, quarantine report and normalisation statistics."""

    manifest: Path
    quarantine: Path
    stats: Path
    content_hash: str
    accepted: int
    quarantined: int
    near_duplicates: int
    bad_fraction: float
    per_source: dict[str, dict[str, int]]


def run_ingest(params: Params, *, progress: bool = True) -> IngestResult:
    """Read every image of the pile once: manifest, quarantine report (bad files never stop it), stats.

    Raises:
        DataValidationError: more than ``ingest.max_bad_fraction`` of the files were quarantined.
    """
    from gfm_core.data.ingest.manifest import build_manifest
    from gfm_core.data.ingest.stats import compute_norm_stats, write_norm_stats

    cfg = params.ingest
    report = build_manifest(
        cfg.root, pretrain_sources(params), cfg.out_dir, settings=cfg.settings, progress=progress
    )
    norm = compute_norm_stats(report.manifest_path, stretch_percentiles=cfg.stretch, data_root=cfg.root)
    stats = write_norm_stats(norm, cfg.out_dir / "norm_stats.json")
    write_json(cfg.out_dir / "ingest_summary.json", {
        "accepted": report.accepted, "quarantined": report.quarantined, "bad_fraction": report.bad_fraction,
        "near_duplicates": report.near_duplicates, "content_hash": report.content_hash,
    })
    result = IngestResult(
        manifest=report.manifest_path, quarantine=report.quarantine_path, stats=stats,
        content_hash=report.content_hash, accepted=report.accepted, quarantined=report.quarantined,
        near_duplicates=report.near_duplicates, bad_fraction=report.bad_fraction,
        per_source={k: dict(v) for k, v in report.per_source.items()},
    )
    if report.bad_fraction > cfg.max_bad_fraction:
        worst = "; ".join(f"{e.path}: {e.reason}" for e in report.entries[:5])
        raise DataValidationError(
            f"{report.quarantine_path}: {report.quarantined} of {report.candidates} files quarantined "
            f"({report.bad_fraction:.1%} > ingest.max_bad_fraction {cfg.max_bad_fraction:.1%}); first: {worst}"
        )
    return result


def run_contamination_check(params: Params, table: Any, manifest_sha256: str) -> Any:
    """Val and test images of every downstream task checked against the manifest; ``contamination.json``.

    ``table`` is the manifest parsed from the bytes whose sha256 is ``manifest_sha256`` (the verdict's binding).
    Returns the :class:`~gfm_core.data.contamination.ContaminationReport`.
    """
    from gfm_core.data.ingest.contamination import check_tasks
    from gfm_core.data.ingest.verdicts import manifest_binding, verdict_paths

    report = check_tasks(table, params.finetune.tasks, params.validation.contamination_exclude)
    content = table.schema.metadata.get(b"gfm.content_hash", b"").decode() if table.schema.metadata else ""
    write_json(verdict_paths(params.ingest.out_dir)[1],
               {**manifest_binding(manifest_sha256, content), **report.to_json()})
    return report


@dataclass(frozen=True)
class ValidateResult:
    """Great-expectations verdict on the ingested pile."""

    success: bool
    n_expectations: int
    failed: tuple[str, ...]
    json: Path
    docs: Path | None
    summary: str


def run_validate(params: Params) -> ValidateResult:
    """Check the manifest against the ``validate`` rules and the downstream tasks (a failed rule is a result).

    Both verdicts (``validation.json``, ``contamination.json``) are removed first and written only when their
    check completes, each bound to the manifest bytes it read (:mod:`gfm_core.data.verdicts`).
    """
    from gfm_core.data.ingest.manifest import load_manifest
    from gfm_core.data.ingest.validation import validate_manifest
    from gfm_core.data.ingest.verdicts import verdict_paths

    cfg, ing = params.validation, params.ingest
    for old in verdict_paths(ing.out_dir):
        old.unlink(missing_ok=True)  # a judgement that does not complete leaves no verdict behind
    manifest = ing.out_dir / "manifest.parquet"
    rep = validate_manifest(
        manifest, pretrain_sources(params), quarantine_path=ing.out_dir / "quarantine.json",
        min_size=cfg.min_size or params.pretrain.student.img_size, max_nodata_fraction=cfg.max_nodata_fraction,
        max_bad_fraction=ing.max_bad_fraction, allowed_bands=cfg.allowed_bands, mean_range=cfg.mean_range,
        out_dir=ing.out_dir / "validation", data_docs=cfg.data_docs,
    )
    import json

    judged = json.loads(rep.json_path.read_text())["manifest_sha256"]
    table, sha = load_manifest(manifest)
    if sha != judged:
        raise DataValidationError(f"{manifest}: rewritten while `gfm validate` ran; run it again")
    leaks = run_contamination_check(params, table, sha)
    failed = tuple(f.name for f in rep.failed)
    summary = rep.summary() + "\n" + leaks.summary()
    if leaks.problems:
        failed += ("downstream_tasks_checked",)
        summary += "\nFAILED downstream_tasks_checked: " + "; ".join(leaks.problems)
    if leaks.offenders:
        failed += ("no_test_images_in_pile",)
        names = "; ".join(f"{o['test_image']} ~ {o['pile_image']} ({o['kind']}, d={o['distance']})"
                          for o in leaks.offenders[:5])
        summary += f"\nFAILED no_test_images_in_pile: {len(leaks.offenders)} downstream val/test image(s) in " \
                   f"the pile: {names}"
    return ValidateResult(
        success=rep.success and leaks.success, n_expectations=rep.n_expectations + 2, failed=failed,
        json=rep.json_path, docs=rep.docs_index, summary=summary,
    )


@dataclass(frozen=True)
class ShardsResult:
    """Training shards written from a validated manifest."""

    shard_dir: Path
    images: int
    shards: int
    bytes: int
    rebuilt: bool
    content_hash: str


def run_shards(params: Params, *, progress: bool = True) -> ShardsResult:
    """Decode every image of the validated pile once into uint8 Arrow shards (skipped when up to date).

    Raises:
        DataValidationError: the pile did not pass ``gfm validate``, or was re-ingested since (run it again).
    """
    from gfm_core.data.ingest.shards import write_shards
    from gfm_core.data.ingest.verdicts import require_verdicts

    ing = params.ingest
    judged = require_verdicts(ing.out_dir)
    from gfm_core.data.ingest.stats import load_stretches

    rep = write_shards(
        ing.out_dir / "manifest.parquet", ing.out_dir / "shards", data_root=ing.root, shard_size=ing.shard_size,
        images_per_shard=ing.images_per_shard, progress=progress,
        stretch=load_stretches(ing.out_dir / "norm_stats.json") if ing.stretch else None,
    )
    if rep.content_hash != judged["manifest_content_hash"]:  # re-ingested while the shards were written
        raise DataValidationError(
            f"{rep.shard_dir}: shards hold pile {rep.content_hash[:12]}, but the validated pile is "
            f"{judged['manifest_content_hash'][:12]} (re-ingested meanwhile); run `gfm validate`, then `gfm shards`"
        )
    return ShardsResult(
        shard_dir=rep.shard_dir, images=rep.images, shards=rep.shards, bytes=rep.bytes, rebuilt=rep.rebuilt,
        content_hash=rep.content_hash,
    )


# ------------------------------------------------------------------------------------------------ pretraining



def pretrain_sources(params: Params) -> list[Any]:
    """The pile's sources: ``ingest.sources`` if listed, else every subfolder of ``ingest.root``.

    Either way a source's ``root`` is relative to ``ingest.root``, the folder every reader is given.
    """
    from gfm_core.data.ingest.sources import discover_sources

    if params.ingest.sources:
        return list(params.ingest.sources)
    return discover_sources(params.ingest.root)


#: Pretraining settings that do not change what a run computes (left out of its fingerprint).
def pretraining_baselines(params: Params) -> list[str]:
    """Names of ``finetune.models`` that are pretraining runs of their own (MIM-only, distill-only, ...)."""
    return [m.name for m in params.finetune.models if m.pretrain]


def baseline_params(params: Params, name: str) -> Params:
    """``params`` with the ablation ``name``'s ``pretrain`` overrides (e.g. ``alpha: 0``) and output folder."""
    from gfm_core.finetune import baseline_pretrain_params

    return baseline_pretrain_params(params, name)


def run_pretrain_baseline(params: Params, name: str, **kwargs: Any) -> PretrainResult:
    """Pretrain the ablation ``name`` into its own folder."""
    return run_pretrain(baseline_params(params, name), **kwargs)


# ------------------------------------------------------------------------------------------------ downstream


def run_finetune(
    params: Params,
    *,
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Any]:
    """Fine-tune every (task, model, seed) of ``finetune`` (or the given subsets) with the same heads and budget.

    Returns the :class:`~gfm_core.finetune.FinetuneResult` of each run (written to ``finetune.out_dir``).
    """
    from gfm_core.finetune import run_finetune as _run

    return _run(params, tasks=list(tasks) if tasks else None, models=list(models) if models else None,
                seeds=list(seeds) if seeds else None)


def run_evaluate(params: Params) -> Any:
    """The comparison report over the fine-tuning results: table, ARP, bootstrap CIs, radar chart."""
    from gfm_core.evaluation.report import run_evaluation

    return run_evaluation(params)


@dataclass(frozen=True)
class PromoteResult:
    """The registered version and the gate's decision."""

    model_name: str
    version: str
    promoted: bool
    reasons: list[str]
    candidate_arp: float
    champion_version: str | None


def lineage_tags(params: Params, backbone: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Where a backbone came from: data manifest hash, teacher, params hash, git sha, dvc.lock hash."""
    import json

    from gfm_core import tracking

    side = json.loads(backbone.with_suffix(".json").read_text()).get("meta", {})
    tags = {
        "gfm.data_manifest": str(side.get("data", {}).get("manifest_content_hash", "unknown")),
        "gfm.teacher": str(side.get("teacher", {}).get("arch", "none")),
        "gfm.teacher_sha256": str(side.get("teacher", {}).get("sha256", "none")),
        "gfm.params_sha256": str(side.get("params_sha256", "unknown")),
        "gfm.git_sha": tracking.git_sha(),
        "gfm.weights_sha256": sha256_file(backbone),
    }
    return {**tags, **dvc_lineage(backbone), **(extra or {})}


def dvc_lineage(backbone: Path, lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """``gfm.dvc_lock_sha256`` and ``gfm.dvc_stage`` when ``lock`` records this very file as a stage output.

    A backbone trained outside DVC (or retrained since the last ``dvc repro``) gets no DVC tags.
    """
    import hashlib

    import yaml

    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{lock}: not a readable dvc.lock ({e})") from e
    target = backbone.resolve()
    for name, stage in stages.items():
        for out in stage.get("outs", []) or []:
            if (lock.parent / out.get("path", "")).resolve() != target:
                continue
            md5 = hashlib.md5(usedforsecurity=False)
            with open(backbone, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    md5.update(chunk)
            if out.get("md5") == md5.hexdigest():
                return {"gfm.dvc_lock_sha256": sha256_file(lock), "gfm.dvc_stage": name}
    return {}


def run_promote(params: Params, *, report: Any = None, tags: dict[str, str] | None = None) -> PromoteResult:
    """Register the candidate backbone as a new ``promote.model_name`` version; alias it only if the gate passes.

    The gate (:mod:`gfm_core.registry`): the candidate's ARP beats every other evaluated model, and the paired
    bootstrap interval of its ARP gain over the current champion lies above ``promote.min_gain``.
    """
    from gfm_core import tracking
    from gfm_core.finetune import get_model

    cfg = params.promote
    if not params.tracking.enabled:
        raise ConfigError("tracking.enabled is false: promotion needs the MLflow registry")
    tracking.configure(params.tracking)
    report = report if report is not None else run_evaluate(params)
    spec = get_model(params, cfg.candidate)
    if spec.path is None or spec.kind != "export":
        raise ConfigError(f"promote.candidate {cfg.candidate!r} must be an exported backbone (kind: export)")
    with tracking.stage_run("promote", cfg.model_dump(mode="json")):
        card = tracking.model_card(spec.path, params, metrics={f"arp.{m}": v for m, v in report.arp.items()})
        version = tracking.register_backbone(spec.path, cfg.model_name, lineage_tags(params, spec.path, tags),
                                             card=card)
        decision = tracking.promote(version, report, cfg, params=params)
        tracking.log_metrics({"arp": decision.candidate_arp, "promoted": float(decision.promoted)})
    return PromoteResult(cfg.model_name, version, decision.promoted, decision.reasons, decision.candidate_arp,
                         decision.champion_version)


# ------------------------------------------------------------------------------------------------ everything


def run_demo(params: Params) -> Iterator[str]:
    """Every stage in order on the embedded default (one MLflow run, a nested run per stage)."""
    if not params.tracking.enabled:
        yield from _demo_stages(params)
        return
    from gfm_core import tracking

    tracking.configure(params.tracking)
    with tracking.stage_run("pipeline", {"preset": params.preset or "paper", "seed": params.seed}):
        yield from _demo_stages(params)
    yield f"[mlflow]    {params.tracking.uri}  (experiment {params.tracking.experiment}; " \
          f"UI: mlflow ui --backend-store-uri {params.tracking.uri})"


def _tracked(params: Params, name: str, section: Any) -> Any:
    if not params.tracking.enabled:
        import contextlib

        return contextlib.nullcontext()
    from gfm_core import tracking

    return tracking.stage_run(name, section.model_dump(mode="json") if hasattr(section, "model_dump") else section)


def _demo_stages(params: Params) -> Iterator[str]:
    from dataclasses import asdict

    t0 = time.perf_counter()
    with _tracked(params, "demo_data", params.demo_data):
        data = run_demo_data(params)
    yield f"[demo-data] {data.root}  (pile: {sum(data.pile_counts.values())} images from {len(data.pile_counts)} "
    yield f"            sources; tasks: {', '.join(data.task_counts)}; teacher: {data.teacher})"
    with _tracked(params, "ingest", params.ingest):
        ing = run_ingest(params)
        _log(params, asdict(ing))
    yield f"[ingest]    {ing.manifest}  ({ing.accepted} images, {ing.quarantined} quarantined, " \
          f"{ing.near_duplicates} near-duplicates; stats: {ing.stats})"
    with _tracked(params, "validate", params.validation):
        val = run_validate(params)
        _log(params, {"success": float(val.success), "failed": len(val.failed)})
    yield f"[validate]  {val.json}  ({val.n_expectations} expectations, {len(val.failed)} failed; docs: {val.docs})"
    if not val.success:
        raise DataValidationError(val.summary)
    with _tracked(params, "shards", params.ingest):
        sh = run_shards(params)
    yield f"[shards]    {sh.shard_dir}  ({sh.images} images in {sh.shards} shard(s), {sh.bytes / 1e6:.1f} MB)"
    with _tracked(params, "pretrain", params.pretrain):
        pre = run_pretrain(params)
        if params.tracking.enabled:
            from gfm_core import tracking

            tracking.log_artifacts({"reconstructions": pre.reconstructions, "metrics": pre.metrics_csv,
                                    "learning": params.pretrain.out_dir / "learning.png"})
    yield f"[pretrain]  {pre.backbone}  ({pre.steps} steps on {pre.device}: {pre.summary()})"
    yield f"            metrics: {pre.metrics_csv}  reconstructions: {pre.reconstructions}"
    for name in pretraining_baselines(params):
        with _tracked(params, f"pretrain_{name}", baseline_params(params, name).pretrain):
            base = run_pretrain_baseline(params, name)
        yield f"[pretrain]  {base.backbone}  (baseline {name}: {base.summary()})"
    with _tracked(params, "finetune", params.finetune):
        runs = run_finetune(params)
        _log(params, {f"{r.task}.{r.model}.seed{r.seed}.{r.headline}": r.score for r in runs})
    yield f"[finetune]  {params.finetune.out_dir}  ({len(runs)} runs: {len(params.finetune.tasks)} tasks x " \
          f"{len(params.finetune.models)} models x {len(params.finetune.seeds)} seeds)"
    with _tracked(params, "evaluate", params.evaluate):
        report = run_evaluate(params)
        _log(params, {f"arp.{m}": v for m, v in report.arp.items()})
    yield f"[evaluate]  {report.paths.get('markdown')}  (ARP vs {report.baseline}: " + ", ".join(
        f"{m} {v:+.2f}" for m, v in report.arp.items()) + ")"
    yield f"            radar chart: {report.paths.get('radar')}"
    if params.tracking.enabled:
        pro = run_promote(params, report=report)
        verdict = "promoted to @" + params.promote.alias if pro.promoted else "not promoted: " + "; ".join(pro.reasons)
        yield f"[promote]   models:/{pro.model_name}/{pro.version}  ({verdict})"
    yield f"[done] in {time.perf_counter() - t0:.0f} s"


def _log(params: Params, metrics: dict[str, Any]) -> None:
    if params.tracking.enabled:
        from gfm_core import tracking

        tracking.log_metrics(metrics)
