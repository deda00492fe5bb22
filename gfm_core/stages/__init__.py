"""One function per pipeline stage. The CLI, Dagster assets, DVC stages and tests all call these.

Each takes the validated :class:`~gfm_core.config.Params` and returns a frozen result of paths and numbers;
none of them knows who called it. By job: :mod:`.data` (demo data, ingest, validate, shards), :mod:`.pretrain`
(the foundation model and its ablations), :mod:`.finetune`, :mod:`.evaluate` (report, promotion) and
:mod:`.pipeline` (every stage in order).
"""

from gfm_core.stages.data import (
    DemoDataStageResult,
    IngestResult,
    ShardsResult,
    ValidateResult,
    pretrain_sources,
    run_contamination_check,
    run_demo_data,
    run_ingest,
    run_shards,
    run_validate,
)
from gfm_core.stages.evaluate import PromoteResult, dvc_lineage, lineage_tags, run_evaluate, run_promote
from gfm_core.stages.finetune import finetune, run_finetune, run_finetune_task
from gfm_core.stages.pipeline import run_demo
from gfm_core.stages.pretrain import (
    PretrainResult,
    ablation_params,
    learning_margins,
    pretrain_fingerprint,
    pretrain_stream,
    run_pretrain,
)

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
    "pretrain_sources",
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
