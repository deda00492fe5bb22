"""Dagster definitions: ``dagster dev -m orchestration.definitions`` (params file from ``$GFM_PARAMS``)."""


import json
import os
from pathlib import Path

import dagster as dg

from gfm_core.config import load_params
from gfm_core.io import sha256_file
from orchestration.assets import (
    ablation_models,
    build_downstream_assets,
    demo_data,
    foundation_model,
    geopile_manifest,
    geopile_shards,
    great_expectations_suite,
    imagenet_teacher,
)
from orchestration.resources import GfmParams, PretrainLauncher


def scan_teachers(folder: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """``{sha256: path}`` of the teacher checkpoints in ``folder`` (missing folder: none)."""
    if not folder.is_dir():
        return {}
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    return {sha256_file(p): str(p) for p in files}


def build_defs(params_path: str = "params.yaml", preset: str | None = None) -> dg.Definitions:
    """Definitions for one params file (its tasks become the fine-tuning partitions)."""
    params = load_params(params_path, preset=preset)
    downstream = build_downstream_assets(params)
    assets = [demo_data, geopile_manifest, geopile_shards, imagenet_teacher, foundation_model, ablation_models,
              *downstream]
    finetuned, evaluation, champion = downstream
    # Jobs never mix the task-partitioned fine-tuning with unpartitioned assets (Dagster launches those apart):
    foundation = dg.define_asset_job(
        "gfm_foundation", selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*downstream),
        description="demo data, ingestion, validation, shards, pretraining and its ablations",
    )
    finetune = dg.define_asset_job("gfm_finetune", selection=[finetuned], partitions_def=finetuned.partitions_def,
                                   description="fine-tune every model on one task (launch a backfill for all)")
    report = dg.define_asset_job("gfm_evaluate_and_promote", selection=[evaluation, champion],
                                 description="the comparison report, then the gated registry promotion")
    retrain = dg.define_asset_job(
        "retrain", selection=dg.AssetSelection.assets(foundation_model, ablation_models),
        description="pretraining again (on a schedule, or when a new teacher appears); fine-tuning follows",
    )
    schedule = dg.ScheduleDefinition(job=retrain, cron_schedule=params.retrain.cron, name="retrain_schedule")

    @dg.sensor(job=retrain, minimum_interval_seconds=300, description="a new ImageNet teacher checkpoint")
    def new_teacher_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        """One run per new teacher file (run key = its sha256); the cursor remembers every hash seen."""
        seen = set(json.loads(context.cursor)) if context.cursor else set()
        found = scan_teachers(params.retrain.teacher_dir, params.retrain.teacher_patterns)
        new = [h for h in sorted(found) if h not in seen]
        requests = [dg.RunRequest(run_key=h, tags={"gfm/teacher_sha256": h, "gfm/teacher_file": found[h]})
                    for h in new]
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(sorted(seen | set(found))))

    return dg.Definitions(
        assets=assets,
        asset_checks=[great_expectations_suite],
        jobs=[foundation, finetune, report, retrain],
        schedules=[schedule],
        sensors=[new_teacher_sensor],
        resources={"gfm": GfmParams(params_path=params_path, preset=preset), "launcher": PretrainLauncher()},
    )


defs = build_defs(os.environ.get("GFM_PARAMS", "params.yaml"), os.environ.get("GFM_PRESET"))
