"""Dagster definitions: ``dagster dev -m orchestration.definitions -h 127.0.0.1``.

Environment: ``GFM_PARAMS`` (params file, default ``params.yaml``), ``GFM_PRESET`` (preset; unset = the file's
own), ``GFM_LAUNCHER`` (``in_process`` | ``subprocess`` | ``torchrun`` | ``deepspeed``) and ``GFM_NPROC``
(ranks per node) pick the pretraining launcher.
"""

from __future__ import annotations

import os
from typing import Any, cast

import dagster as dg

from gfm_core.config import load_params
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
from orchestration.resources import GfmParams, MlflowTracking, PretrainLauncher
from orchestration.scenes import build_scene_sensor, embed_scenes, scene_embeddings
from orchestration.science import science_job, science_report
from orchestration.sensors import build_retrain_schedule, build_teacher_sensor


def default_resources(params_path: str = "params.yaml", preset: str | None = None) -> dict[str, Any]:
    """The resources of the embedded default: params file, MLflow from params, launcher from the environment."""
    launcher = PretrainLauncher(mode=cast(Any, os.environ.get("GFM_LAUNCHER", "in_process")),  # pydantic checks it
                                nproc_per_node=int(os.environ.get("GFM_NPROC", "1")))
    return {"gfm": GfmParams(params_path=params_path, preset=preset), "mlflow": MlflowTracking(),
            "launcher": launcher}


def build_defs(
    params_path: str = "params.yaml", preset: str | None = None, *, resources: dict[str, Any] | None = None
) -> dg.Definitions:
    """Definitions for one params file (its tasks become the fine-tuning partitions)."""
    params = load_params(params_path, preset=preset)
    downstream = build_downstream_assets(params)
    assets = [demo_data, geopile_manifest, geopile_shards, imagenet_teacher, foundation_model, ablation_models,
              *downstream, science_report, scene_embeddings]
    finetuned, evaluation, champion = downstream
    # Jobs never mix the task-partitioned fine-tuning with unpartitioned assets (Dagster launches those apart):
    foundation = dg.define_asset_job(
        "gfm_foundation",
        selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*downstream, science_report, scene_embeddings),
        description="demo data, ingestion, validation, shards, pretraining and its ablations",
    )
    finetune = dg.define_asset_job("gfm_finetune", selection=[finetuned], partitions_def=finetuned.partitions_def,
                                   description="fine-tune every model on one task (launch a backfill for all)")
    report = dg.define_asset_job("gfm_evaluate_and_promote", selection=[evaluation, champion],
                                 description="the comparison report, then the gated registry promotion")
    retrain = dg.define_asset_job(
        "retrain", selection=dg.AssetSelection.assets(foundation_model, ablation_models),
        description="pretraining again (on a schedule, or on a new teacher); fine-tuning, evaluation and "
                    "promotion follow by their eager automation conditions",
    )
    observe = dg.define_asset_job("observe_teacher", selection=[imagenet_teacher],
                                  description="record the teacher file's sha256 as imagenet_teacher's data version")
    return dg.Definitions(
        assets=assets,
        asset_checks=[great_expectations_suite],
        jobs=[foundation, finetune, report, retrain, observe, science_job, embed_scenes],
        schedules=[build_retrain_schedule(params, lambda: load_params(params_path, preset=preset), retrain)],
        sensors=[
            build_teacher_sensor(lambda: load_params(params_path, preset=preset), retrain),
            build_scene_sensor(lambda: load_params(params_path, preset=preset)),
            dg.AutomationConditionSensorDefinition(
                "gfm_automation", target=dg.AssetSelection.assets(*downstream),
                default_status=dg.DefaultSensorStatus.RUNNING,
                description="fine-tuning, evaluation and promotion follow a (re)training (eager conditions)",
            ),
        ],
        resources=resources or default_resources(params_path, preset),
    )


defs = build_defs(os.environ.get("GFM_PARAMS", "params.yaml"), os.environ.get("GFM_PRESET"))
