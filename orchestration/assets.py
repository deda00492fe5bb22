"""One asset per pipeline stage; each calls the ``gfm_core.stages`` function and reports metadata.

Graph: demo_data -> geopile_manifest (+ blocking great-expectations check) -> geopile_shards -> foundation_model
(also fed by the observable ``imagenet_teacher``, whose data version is the checkpoint's sha256) and
ablation_models -> finetuned_models (one partition per task) -> evaluation_report -> champion_model.

Each asset runs its stage inside an MLflow stage run (nested under one parent run per Dagster run) and links
to it; a gfm_core error becomes a Dagster failure whose description names the file or key at fault.
Fine-tuning, evaluation and promotion are ``eager``: after a (re)training they follow on their own.
"""


import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from gfm_core import stages
from gfm_core.config import Params
from gfm_core.errors import ConfigError
from gfm_core.io import sha256_file
from gfm_core.stages.pretrain import pretrain_artifacts
from orchestration.resources import GfmParams, MlflowTracking, PretrainLauncher, stage_errors

EAGER = dg.AutomationCondition.eager()


def _table(rows: Sequence[dict[str, Any]]) -> dg.MetadataValue:
    """Rows of a dict list as a markdown table for the UI."""
    if not rows:
        return dg.MetadataValue.md("(none)")
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def _image(key: str, path: Path, max_bytes: int = 1 << 20) -> dict[str, dg.MetadataValue]:
    """A PNG as metadata: its path, and the picture itself (inline markdown) when it is small enough."""
    if not path.is_file():
        return {}
    out: dict[str, dg.MetadataValue] = {key: dg.MetadataValue.path(str(path))}
    if path.stat().st_size <= max_bytes:
        data = base64.b64encode(path.read_bytes()).decode()
        out[f"{key}_image"] = dg.MetadataValue.md(f"![{key}](data:image/png;base64,{data})")
    return out


def _track(metrics: dict[str, Any] | None = None, files: dict[str, Any] | None = None, step: int | None = None,
           artifact_path: str | None = None) -> None:
    """Metrics and files to the active MLflow stage run (no-op when untracked)."""
    from gfm_core import tracking

    if metrics:
        tracking.log_metrics(metrics, step=step)
    if files:
        tracking.log_artifacts(files, artifact_path)


@dg.asset(group_name="data", kinds={"python"},
          description="Embedded demo GeoPile, tasks and ImageNet teacher from real imagery")
def demo_data(context: dg.AssetExecutionContext, gfm: GfmParams, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Build the demo data (:func:`gfm_core.stages.run_demo_data`); report what it holds."""
    with stage_errors():
        params = mlflow.apply(gfm.load())
        with mlflow.stage(context, params, "demo_data") as run_id:
            res = stages.run_demo_data(params)
            _track(res.tracked_metrics(), res.tracked_files())
    return dg.MaterializeResult(metadata={
        "root": dg.MetadataValue.path(str(res.root)),
        "pile_images": sum(res.pile_counts.values()),
        "pile_sources": _table([{"source": k, "images": v} for k, v in res.pile_counts.items()]),
        "tasks": _table([{"task": t, **c} for t, c in res.task_counts.items()]),
        "teacher": dg.MetadataValue.path(str(res.teacher)),
        **mlflow.links(run_id),
    })


@dg.asset(deps=[demo_data], group_name="data", kinds={"python"},
          description="GeoPile manifest (ingest): every image read once, bad files quarantined, normalisation stats")
def geopile_manifest(context: dg.AssetExecutionContext, gfm: GfmParams,
                     mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Ingest the pile (:func:`gfm_core.stages.run_ingest`); the data version is the manifest's content hash."""
    with stage_errors():
        params = mlflow.apply(gfm.load())
        with mlflow.stage(context, params, "ingest") as run_id:
            res = stages.run_ingest(params, progress=False)
            _track(res.tracked_metrics(), res.tracked_files())
    return dg.MaterializeResult(
        metadata={
            "manifest": dg.MetadataValue.path(str(res.manifest)),
            "accepted": res.accepted,
            "quarantined": res.quarantined,
            "quarantine_rate": res.bad_fraction,
            "near_duplicates": res.near_duplicates,
            "content_hash": res.content_hash,
            "normalisation_stats": dg.MetadataValue.path(str(res.stats)),
            "per_source": _table([{"source": k, **v} for k, v in res.per_source.items()]),
            **mlflow.links(run_id),
        },
        data_version=dg.DataVersion(res.content_hash),
    )


@dg.asset_check(asset=geopile_manifest, blocking=True,
                description="great-expectations suite on the manifest (validate); failing blocks everything below")
def great_expectations_suite(context: dg.AssetCheckExecutionContext, gfm: GfmParams,
                             mlflow: MlflowTracking) -> dg.AssetCheckResult:
    """Validate the manifest (:func:`gfm_core.stages.run_validate`); a failure blocks every asset below."""
    with stage_errors():
        params = mlflow.apply(gfm.load())
        with mlflow.stage(context, params, "validate") as run_id:
            res = stages.run_validate(params)
            _track(res.tracked_metrics(), res.tracked_files())
    return dg.AssetCheckResult(
        passed=res.success,
        metadata={
            "expectations": res.n_expectations,
            "failed": ", ".join(res.failed) or "none",
            "summary": dg.MetadataValue.md(f"```\n{res.summary}\n```"),
            "results": dg.MetadataValue.path(str(res.json)),
            **({"data_docs": dg.MetadataValue.path(str(res.docs))} if res.docs else {}),
            **mlflow.links(run_id),
        },
    )


@dg.asset(deps=[geopile_manifest], group_name="data", kinds={"python"},
          description="Training shards (uint8 Arrow) of the validated pile")
def geopile_shards(context: dg.AssetExecutionContext, gfm: GfmParams,
                   mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Write the training shards (:func:`gfm_core.stages.run_shards`), versioned by the pile's content hash."""
    with stage_errors():
        params = mlflow.apply(gfm.load())
        with mlflow.stage(context, params, "shards") as run_id:
            res = stages.run_shards(params, progress=False)
            _track(res.tracked_metrics(), res.tracked_files())
    return dg.MaterializeResult(
        metadata={"shards": dg.MetadataValue.path(str(res.shard_dir)), "images": res.images,
                  "files": res.shards, "megabytes": round(res.bytes / 1e6, 1), "rebuilt": res.rebuilt,
                  **mlflow.links(run_id)},
        data_version=dg.DataVersion(res.content_hash),
    )


def teacher_file(params: Params) -> Any:
    """The teacher checkpoint named by params (a missing file is an error naming the key and the path)."""
    path = params.pretrain.teacher.checkpoint
    if path is None or not path.is_file():
        raise ConfigError(f"pretrain.teacher.checkpoint: teacher weight file {path} not found")
    return path


@dg.observable_source_asset(group_name="models", description="The frozen ImageNet teacher's weight file")
def imagenet_teacher(gfm: GfmParams) -> dg.DataVersion:
    """Its data version is the file's sha256: a new teacher makes every model downstream stale."""
    with stage_errors():
        return dg.DataVersion(sha256_file(teacher_file(gfm.load())))


def _curve(history: Sequence[dict[str, float]], rows: int = 20) -> list[dict[str, float]]:
    """At most ``rows`` evenly spaced records of a loss history (first and last included)."""
    if len(history) <= rows:
        picked = list(history)
    else:
        picked = [history[round(i * (len(history) - 1) / (rows - 1))] for i in range(rows)]
    keys = ("step", "loss", "mim", "distill", "cosine", "lr", "mim_holdout", "mim_trivial_holdout", "cos_holdout",
            "cos_mean_vector_holdout")
    return [{k: (int(r[k]) if k == "step" else float(r[k])) for k in keys if k in r} for r in picked]


def _pretrain(context: dg.AssetExecutionContext, gfm: GfmParams, mlflow: MlflowTracking,
              launcher: PretrainLauncher, ablation: str | None = None) -> tuple[Any, str | None, Params]:
    gfm = gfm.for_run(context.run.tags)  # a retraining run on a new teacher names it in its tags
    with stage_errors():
        params = mlflow.apply(gfm.load())
        section = params.pretrain.ablation(ablation) if ablation else params.pretrain
        name = f"pretrain_{ablation}" if ablation else "pretrain"
        with mlflow.stage(context, params, "pretrain", name, section) as run_id:
            res = launcher.pretrain(context, gfm, ablation, mlflow_run_id=run_id, params=params)
            _log_start(context, res.summary)
            _track(_compute_metrics(res.summary), pretrain_artifacts(section.out_dir))
    return res, run_id, params


def _log_start(context: dg.AssetExecutionContext, summary: dict[str, Any]) -> None:
    """Say in the run's log whether pretraining continued an interrupted run or started fresh, and why."""
    why = summary.get("start_reason", "")
    if summary.get("set_aside"):
        context.log.warning(f"{why}; the earlier run's checkpoints were moved to {summary['set_aside']}")
    else:
        context.log.info(why)


def _compute_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a run's compute ledger (``summary.json`` ``compute``), as ``compute.<field>``."""
    ledger = summary.get("compute") or {}
    return {f"compute.{k}": float(v) for k, v in ledger.items() if isinstance(v, int | float) and
            not isinstance(v, bool)}


def _start_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """Where pretraining started (0 = fresh), why, and where an earlier run's checkpoints went."""
    aside = summary.get("set_aside")
    return {"start_step": int(summary.get("start_step", 0)), "start_reason": str(summary.get("start_reason", "")),
            **({"set_aside": dg.MetadataValue.path(str(aside))} if aside else {})}


#: Concurrency pool of the pretraining assets: with the instance's pool limit of 1 (``concurrency: pools:
#: default_limit: 1`` in dagster.yaml, as ``make env`` writes it) two pretrainings never run at once.
PRETRAIN_POOL = "gfm_pretrain"


@dg.asset(deps=[geopile_shards, imagenet_teacher], group_name="models", kinds={"pytorch", "mlflow"},
          pool=PRETRAIN_POOL,
          description="Foundation model: GFM teacher-student continual pretraining (the student backbone)")
def foundation_model(context: dg.AssetExecutionContext, gfm: GfmParams, mlflow: MlflowTracking,
                     launcher: PretrainLauncher) -> dg.MaterializeResult:
    """Pretrain the student through the launcher; report the loss curve, pictures and final metrics."""
    res, run_id, params = _pretrain(context, gfm, mlflow, launcher)
    finals = {f"final_{k}": float(v) for k, v in res.summary.items() if isinstance(v, float)}
    teacher = params.pretrain.teacher
    return dg.MaterializeResult(metadata={
        "backbone": dg.MetadataValue.path(str(res.backbone)),
        "steps": int(res.summary.get("steps", 0)),
        "device": str(res.summary.get("device")),
        "teacher": f"{teacher.arch} ({teacher.checkpoint})",
        **_start_metadata(res.summary),
        **_compute_metrics(res.summary),
        "energy_source": str((res.summary.get("compute") or {}).get("energy_source", "")),
        "loss_curve": _table(_curve(res.history)),
        "metrics_csv": dg.MetadataValue.path(str(params.pretrain.out_dir / "metrics.csv")),
        **_image("reconstructions", params.pretrain.out_dir / "reconstructions.png"),
        **_image("learning", params.pretrain.out_dir / "learning.png"),
        **finals,
        **mlflow.links(run_id),
    })


@dg.asset(deps=[geopile_shards, imagenet_teacher], group_name="models", kinds={"pytorch", "mlflow"},
          pool=PRETRAIN_POOL,
          description="The paper's pretraining ablations (MIM-only, distill-only) at the same budget")
def ablation_models(context: dg.AssetExecutionContext, gfm: GfmParams, mlflow: MlflowTracking,
                    launcher: PretrainLauncher) -> dg.MaterializeResult:
    """Pretrain each of ``finetune.ablations`` in turn, one MLflow stage run each."""
    rows = []
    with stage_errors():
        names = gfm.load().finetune.ablations
    for name in names:
        res, run_id, _ = _pretrain(context, gfm, mlflow, launcher, ablation=name)
        rows.append({"model": name, "backbone": str(res.backbone), "steps": int(res.summary.get("steps", 0)),
                     "start_step": int(res.summary.get("start_step", 0)),
                     "loss": float(res.summary.get("loss", float("nan"))), "mlflow_run_id": run_id or ""})
    return dg.MaterializeResult(metadata={"models": _table(rows), "count": len(rows)})


def task_partitions(params: Params) -> dg.StaticPartitionsDefinition:
    """One partition per downstream task in params."""
    names = [t.name for t in params.finetune.tasks]
    if not names:
        raise ConfigError("finetune.tasks: no downstream task configured")
    return dg.StaticPartitionsDefinition(names)


def build_downstream_assets(params: Params) -> list[Any]:
    """The fine-tuning (partitioned by task), evaluation and promotion assets for the tasks in ``params``."""

    @dg.asset(deps=[foundation_model, ablation_models], partitions_def=task_partitions(params),
              group_name="downstream", kinds={"pytorch", "mlflow"}, automation_condition=EAGER,
              description="Fine-tuned models: every model on one task (same heads, same budget)")
    def finetuned_models(context: dg.AssetExecutionContext, gfm: GfmParams,
                         mlflow: MlflowTracking) -> dg.MaterializeResult:
        task = context.partition_key
        with stage_errors():
            params = mlflow.apply(gfm.load())
            with mlflow.stage(context, params, "finetune", f"finetune_{task}") as run_id:
                runs = stages.run_finetune(params, tasks=[task])
                if run_id is not None:
                    from gfm_core.stages.finetune import log_runs  # torch: loaded when the asset runs

                    log_runs(runs)
        rows = [{"model": r.model, "seed": r.seed, r.headline: r.score, "steps": r.steps, "test_samples":
                 r.test_samples, "device_hours": r.compute.get("device_hours"), "co2_kg": r.compute.get("co2_kg")}
                for r in runs]
        totals = {f"compute.{k}": float(sum(r.compute.get(k) or 0.0 for r in runs))  # the ledgers of every run
                  for k in ("device_hours", "energy_kwh", "co2_kg", "flops")}
        return dg.MaterializeResult(metadata={"runs": len(runs), "results": _table(rows), **totals,
                                              **mlflow.links(run_id)})

    @dg.asset(deps=[finetuned_models], group_name="downstream", kinds={"mlflow"}, automation_condition=EAGER,
              description="Evaluation report: table, ARP vs the ImageNet baseline, bootstrap CIs, radar chart")
    def evaluation_report(context: dg.AssetExecutionContext, gfm: GfmParams,
                          mlflow: MlflowTracking) -> dg.MaterializeResult:
        with stage_errors():
            params = mlflow.apply(gfm.load())
            with mlflow.stage(context, params, "evaluate") as run_id:
                report = stages.run_evaluate(params)
                _track(report.tracked_metrics(), report.tracked_files())
        cis = [{"model": m, "task": t, "diff": c.diff, "lo": c.lo, "hi": c.hi} for m, d in report.ci.items()
               for t, c in d.items()]
        return dg.MaterializeResult(metadata={
            "report": dg.MetadataValue.md(report.paths["markdown"].read_text()),
            "radar": dg.MetadataValue.path(str(report.paths["radar"])),
            f"bootstrap_vs_{report.reference}": _table(cis),
            "missing": len(report.missing),
            **{f"arp_{m}": float(v) for m, v in report.arp.items()},
            **mlflow.links(run_id),
        })

    @dg.asset(deps=[evaluation_report], group_name="downstream", kinds={"mlflow"}, automation_condition=EAGER,
              check_specs=[dg.AssetCheckSpec("candidate_promoted", asset="champion_model",
                                             description="the new version passed the gate (WARN when refused)")],
              description="Champion model: registers the foundation model; @champion moves only if the gate passes")
    def champion_model(context: dg.AssetExecutionContext, gfm: GfmParams,
                       mlflow: MlflowTracking) -> dg.MaterializeResult:
        with stage_errors():
            params = mlflow.apply(gfm.load())
            with mlflow.stage(context, params, "promote"):
                res = stages.run_promote(params, tags={"gfm.dagster_run_id": context.run.run_id})
                _track(res.tracked_metrics(), res.tracked_files())
        from gfm_core import tracking

        url = tracking.model_version_url(res.model_name, res.version, mlflow.ui_url)
        gate = "\n".join(f"- {r}" for r in res.reasons) or "passed: beats every baseline and the champion"
        return dg.MaterializeResult(
            metadata={
                "registered": f"models:/{res.model_name}/{res.version}",
                "promoted": res.promoted,
                "candidate_arp": res.candidate_arp,
                "champion_before": res.champion_version or "none",
                "champion": f"models:/{res.model_name}@{params.promote.alias}",
                "gate": dg.MetadataValue.md(gate),
                **({"model_version": dg.MetadataValue.url(url)} if url else {}),
            },
            check_results=[dg.AssetCheckResult(
                check_name="candidate_promoted", passed=res.promoted, severity=dg.AssetCheckSeverity.WARN,
                metadata={"version": res.version, "reasons": "; ".join(res.reasons) or "none"},
            )],
        )

    return [finetuned_models, evaluation_report, champion_model]
