"""One asset per pipeline stage; each calls the ``gfm_core.stages`` function of the same name and reports metadata.

Graph: demo_data -> geopile_manifest (+ blocking great-expectations check) -> geopile_shards -> foundation_model
(also fed by the observable ``imagenet_teacher``) and ablation_models -> finetuned_models (one partition per
task) -> evaluation_report.
"""


from collections.abc import Sequence
from typing import Any

import dagster as dg

from gfm_core import stages
from gfm_core.config import Params
from gfm_core.errors import ConfigError
from gfm_core.io import sha256_file
from orchestration.resources import GfmParams, PretrainLauncher


def _table(rows: Sequence[dict[str, Any]]) -> dg.MetadataValue:
    """Rows of a dict list as a markdown table for the UI."""
    if not rows:
        return dg.MetadataValue.md("(none)")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


@dg.asset(group_name="data", description="Embedded demo GeoPile, tasks and ImageNet teacher from real imagery")
def demo_data(gfm: GfmParams) -> dg.MaterializeResult:
    res = stages.run_demo_data(gfm.load())
    return dg.MaterializeResult(metadata={
        "root": dg.MetadataValue.path(str(res.root)),
        "pile_images": sum(res.pile_counts.values()),
        "pile_sources": _table([{"source": k, "images": v} for k, v in res.pile_counts.items()]),
        "teacher": dg.MetadataValue.path(str(res.teacher)),
    })


@dg.asset(deps=[demo_data], group_name="data", description="Manifest of the pile; bad files quarantined")
def geopile_manifest(gfm: GfmParams) -> dg.MaterializeResult:
    res = stages.run_ingest(gfm.load(), progress=False)
    return dg.MaterializeResult(
        metadata={
            "manifest": dg.MetadataValue.path(str(res.manifest)),
            "accepted": res.accepted,
            "quarantined": res.quarantined,
            "quarantine_rate": res.bad_fraction,
            "near_duplicates": res.near_duplicates,
            "content_hash": res.content_hash,
            "per_source": _table([{"source": k, **v} for k, v in res.per_source.items()]),
        },
        data_version=dg.DataVersion(res.content_hash),
    )


@dg.asset_check(asset=geopile_manifest, blocking=True, description="great-expectations suite on the manifest")
def great_expectations_suite(gfm: GfmParams) -> dg.AssetCheckResult:
    res = stages.run_validate(gfm.load())
    return dg.AssetCheckResult(
        passed=res.success,
        metadata={
            "expectations": res.n_expectations,
            "failed": ", ".join(res.failed) or "none",
            "summary": dg.MetadataValue.md(f"```\n{res.summary}\n```"),
            "results": dg.MetadataValue.path(str(res.json)),
            **({"data_docs": dg.MetadataValue.path(str(res.docs))} if res.docs else {}),
        },
    )


@dg.asset(deps=[geopile_manifest], group_name="data", description="uint8 Arrow shards of the validated pile")
def geopile_shards(gfm: GfmParams) -> dg.MaterializeResult:
    res = stages.run_shards(gfm.load(), progress=False)
    return dg.MaterializeResult(
        metadata={"shards": dg.MetadataValue.path(str(res.shard_dir)), "images": res.images,
                  "files": res.shards, "megabytes": round(res.bytes / 1e6, 1), "rebuilt": res.rebuilt},
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
    return dg.DataVersion(sha256_file(teacher_file(gfm.load())))


def _pretrain_metadata(backbone: Any, summary: dict[str, Any]) -> dict[str, Any]:
    parts = {k: v for k, v in summary.items() if isinstance(v, float)}
    return {"backbone": dg.MetadataValue.path(str(backbone)), "steps": summary.get("steps", 0),
            "device": str(summary.get("device")), **{f"final_{k}": v for k, v in parts.items()}}


@dg.asset(deps=[geopile_shards, imagenet_teacher], group_name="models",
          description="GFM student: teacher-student continual pretraining; the foundation model")
def foundation_model(context: dg.AssetExecutionContext, gfm: GfmParams,
                     launcher: PretrainLauncher) -> dg.MaterializeResult:
    backbone, summary = launcher.pretrain(context, gfm)
    params = gfm.load()
    curve = params.pretrain.out_dir / "metrics.csv"
    rows = []
    if curve.is_file():
        import csv

        with open(curve) as f:
            rows = [{k: float(r[k]) for k in ("step", "loss", "mim", "distill") if k in r} for r in csv.DictReader(f)]
    meta = _pretrain_metadata(backbone, summary)
    meta["loss_curve"] = _table(rows[-20:])
    return dg.MaterializeResult(metadata=meta)


@dg.asset(deps=[geopile_shards, imagenet_teacher], group_name="models",
          description="The paper's pretraining ablations (MIM-only, distill-only) at the same budget")
def ablation_models(context: dg.AssetExecutionContext, gfm: GfmParams,
                    launcher: PretrainLauncher) -> dg.MaterializeResult:
    rows = []
    for name in stages.pretraining_baselines(gfm.load()):
        backbone, summary = launcher.pretrain(context, gfm, baseline=name)
        rows.append({"model": name, "backbone": str(backbone), "loss": summary.get("loss", float("nan"))})
    return dg.MaterializeResult(metadata={"models": _table(rows)})


def task_partitions(params: Params) -> dg.StaticPartitionsDefinition:
    """One partition per downstream task in params."""
    names = [t.name for t in params.finetune.tasks]
    if not names:
        raise ConfigError("finetune.tasks: no downstream task configured")
    return dg.StaticPartitionsDefinition(names)


def build_downstream_assets(params: Params) -> list[Any]:
    """The fine-tuning (partitioned by task) and evaluation assets for the tasks in ``params``."""

    @dg.asset(deps=[foundation_model, ablation_models], partitions_def=task_partitions(params),
              group_name="downstream", description="Every model fine-tuned on one task (same heads, same budget)")
    def finetuned_models(context: dg.AssetExecutionContext, gfm: GfmParams) -> dg.MaterializeResult:
        runs = stages.run_finetune(gfm.load(), tasks=[context.partition_key])
        rows = [{"model": r.model, "seed": r.seed, r.headline: r.score} for r in runs]
        return dg.MaterializeResult(metadata={"runs": len(runs), "results": _table(rows)})

    @dg.asset(deps=[finetuned_models], group_name="downstream",
              description="Comparison report: table, ARP vs the ImageNet baseline, bootstrap CIs, radar chart")
    def evaluation_report(gfm: GfmParams) -> dg.MaterializeResult:
        report = stages.run_evaluate(gfm.load())
        return dg.MaterializeResult(metadata={
            "report": dg.MetadataValue.md(report.paths["markdown"].read_text()),
            "radar": dg.MetadataValue.path(str(report.paths["radar"])),
            **{f"arp_{m}": float(v) for m, v in report.arp.items()},
        })

    @dg.asset(deps=[evaluation_report], group_name="downstream",
              description="Registers the foundation model; moves @champion only when the evaluation gate passes")
    def champion_model(context: dg.AssetExecutionContext, gfm: GfmParams) -> dg.MaterializeResult:
        res = stages.run_promote(gfm.load(), tags={"gfm.dagster_run_id": context.run_id})
        return dg.MaterializeResult(metadata={
            "registered": f"models:/{res.model_name}/{res.version}",
            "promoted": res.promoted,
            "candidate_arp": res.candidate_arp,
            "champion_before": res.champion_version or "none",
            "gate": dg.MetadataValue.md("\n".join(f"- {r}" for r in res.reasons) or "passed"),
        })

    return [finetuned_models, evaluation_report, champion_model]
