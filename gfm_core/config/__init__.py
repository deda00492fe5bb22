"""Typed experiment config: ``params.yaml`` -> pydantic models.

``params.yaml`` holds the paper's values in its stage sections and named presets (``presets.demo``) that override
some of them. The top-level ``preset`` key (or ``--preset`` on the CLI) picks the preset in force.

Sections by job: :mod:`.data` (demo data, ingest, validate), :mod:`.pretrain`, :mod:`.downstream` (tasks, models,
fine-tuning, evaluation), :mod:`.registry` (tracking, promotion, retraining), :mod:`.compute` (the ledger's prices),
:mod:`.science`, :mod:`.inference` (scenes embedded on demand); :mod:`.params`
holds the whole file, its presets and the loaders.
"""

from gfm_core.config.base import Section
from gfm_core.config.compute import ComputeCfg
from gfm_core.config.data import DemoDataCfg, IngestCfg, ValidateCfg
from gfm_core.config.downstream import BackboneSpec, EvaluateCfg, FinetuneCfg, TaskCfg, TaskLayout, derive_models
from gfm_core.config.inference import InferenceCfg
from gfm_core.config.params import Params, load_params, parse_params, teacher_overrides
from gfm_core.config.pretrain import PretrainCfg, StudentCfg, TeacherCfg
from gfm_core.config.registry import PromoteCfg, RetrainCfg, TrackingCfg
from gfm_core.config.science import EvalSetCfg, ScienceCfg

__all__ = [
    "BackboneSpec",
    "ComputeCfg",
    "DemoDataCfg",
    "EvalSetCfg",
    "EvaluateCfg",
    "FinetuneCfg",
    "InferenceCfg",
    "IngestCfg",
    "Params",
    "PretrainCfg",
    "PromoteCfg",
    "RetrainCfg",
    "ScienceCfg",
    "Section",
    "StudentCfg",
    "TaskCfg",
    "TaskLayout",
    "TeacherCfg",
    "TrackingCfg",
    "ValidateCfg",
    "derive_models",
    "load_params",
    "parse_params",
    "teacher_overrides",
]
