"""One function per pipeline stage. The CLI, Dagster assets, DVC stages and tests all call these.

Each takes the validated :class:`~gfm_core.config.Params` and returns a frozen result of paths and numbers;
none of them knows who called it. By job: :mod:`.data` (demo data, ingest, validate, shards), :mod:`.pretrain`
(the foundation model and its ablations), :mod:`.finetune`, :mod:`.evaluate` (report, promotion),
:mod:`.pipeline` (every stage in order) and :mod:`.inference` (scenes embedded on demand; not in the list below:
no pipeline run reaches it).
"""

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as every runner names it.

    Attributes:
        name: the CLI subcommand, the DVC stage (``finetune@<task>`` per task) and the MLflow stage run
            (``finetune_<task>`` per task, ``pretrain_<ablation>`` per ablation).
        section: the params section its MLflow run records.
        asset: its Dagster asset (``validate``: the blocking asset check on the manifest).
        dvc: whether ``dvc.yaml`` runs it (promotion needs the registry: Dagster and ``gfm demo`` only).
    """

    name: str
    section: str
    asset: str
    dvc: bool = True


#: The stages in order. The Dagster assets, ``gfm demo`` and ``dvc.yaml`` follow it (tests/test_stage_list.py).
STAGES: tuple[Stage, ...] = (
    Stage("demo_data", "demo_data", "demo_data"),
    Stage("ingest", "ingest", "geopile_manifest"),
    Stage("validate", "validation", "great_expectations_suite"),
    Stage("shards", "ingest", "geopile_shards"),
    Stage("pretrain", "pretrain", "foundation_model"),
    Stage("finetune", "finetune", "finetuned_models"),
    Stage("evaluate", "evaluate", "evaluation_report"),
    Stage("promote", "promote", "champion_model", dvc=False),
)


def stage(name: str) -> Stage:
    """The stage named ``name`` (a ``KeyError`` lists the valid names)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; valid: {', '.join(s.name for s in STAGES)}")

#: Public name -> the submodule defining it. Loaded on first use (PEP 562), so that importing the stage list
#: (the Dagster definitions do) imports no torch.
_HOMES = {
    **dict.fromkeys(("TEACHER_FILE", "DemoDataStageResult", "IngestResult", "ShardsResult", "ValidateResult",
                     "run_contamination_check", "run_demo_data", "run_ingest", "run_shards", "run_validate"), "data"),
    **dict.fromkeys(("PromoteResult", "dvc_lineage", "lineage_tags", "run_evaluate", "run_promote"), "evaluate"),
    **dict.fromkeys(("finetune", "run_finetune", "run_finetune_task"), "finetune"),
    **dict.fromkeys(("run_demo",), "pipeline"),
    **dict.fromkeys(("SceneEmbedResult", "embeddings_path", "list_scenes", "run_scene_embeddings", "scene_path"),
                    "inference"),
    **dict.fromkeys(("PretrainResult", "ablation_params", "learning_margins", "pretrain_fingerprint",
                     "pretrain_stream", "run_pretrain"), "pretrain"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gfm_core.stages' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gfm_core.stages.{_HOMES[name]}"), name)


__all__ = [
    "STAGES",
    "TEACHER_FILE",
    "DemoDataStageResult",
    "IngestResult",
    "PretrainResult",
    "PromoteResult",
    "SceneEmbedResult",
    "ShardsResult",
    "Stage",
    "ValidateResult",
    "ablation_params",
    "dvc_lineage",
    "embeddings_path",
    "finetune",
    "learning_margins",
    "lineage_tags",
    "list_scenes",
    "pretrain_fingerprint",
    "pretrain_stream",
    "run_contamination_check",
    "run_demo",
    "run_demo_data",
    "run_evaluate",
    "run_finetune",
    "run_finetune_task",
    "run_ingest",
    "run_pretrain",
    "run_promote",
    "run_scene_embeddings",
    "run_shards",
    "run_validate",
    "scene_path",
    "stage",
]
