"""One function per pipeline stage. The CLI, Dagster assets, DVC stages and tests all call these.

Each takes the validated :class:`~gfm_core.config.Params` and returns a frozen result of paths and numbers;
none of them knows who called it. By job: :mod:`.data` (demo data, ingest, validate, shards), :mod:`.pretrain`
(the foundation model and its ablations), :mod:`.finetune`, :mod:`.evaluate` (report, promotion) and
:mod:`.pipeline` (every stage in order).
"""

import importlib
from typing import Any

#: Public name -> the submodule defining it. Loaded on first use (PEP 562), so that importing the stage list
#: (the Dagster definitions do) imports no torch.
_HOMES = {
    **dict.fromkeys(("DemoDataStageResult", "IngestResult", "ShardsResult", "ValidateResult",
                     "run_contamination_check", "run_demo_data", "run_ingest", "run_shards", "run_validate"), "data"),
    **dict.fromkeys(("PromoteResult", "dvc_lineage", "lineage_tags", "run_evaluate", "run_promote"), "evaluate"),
    **dict.fromkeys(("finetune", "run_finetune", "run_finetune_task"), "finetune"),
    **dict.fromkeys(("run_demo",), "pipeline"),
    **dict.fromkeys(("PretrainResult", "ablation_params", "learning_margins", "pretrain_fingerprint",
                     "pretrain_stream", "run_pretrain"), "pretrain"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gfm_core.stages' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gfm_core.stages.{_HOMES[name]}"), name)


__all__ = [
    "DemoDataStageResult",
    "IngestResult",
    "PretrainResult",
    "PromoteResult",
    "ShardsResult",
    "ValidateResult",
    "ablation_params",
    "dvc_lineage",
    "finetune",
    "learning_margins",
    "lineage_tags",
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
    "run_shards",
    "run_validate",
]
