"""MLflow: stage runs, per-step metrics, the ``gfm-foundation`` registry and gated promotion by alias.

The only package that imports mlflow (lazily). The default store is sqlite plus local artifacts under
``outputs/``; a tracking server is one setting (``tracking.uri``).

- **Runs.** :func:`pipeline_run` opens (or resumes) one parent run per pipeline execution, keyed by a tag
  (the Dagster run id, or one ``gfm demo``); :func:`stage_run` opens a nested run per stage with the stage's
  params section flattened into MLflow params; :class:`MlflowCallback` sends every logged training step.
- **Registry.** :func:`register_backbone` logs the exported backbone as an MLflow *pyfunc model from code*
  (``backbone/``: ``MLmodel``, ``code.py``, ``artifacts/backbone.safetensors`` + its JSON sidecar, and
  ``model_card.md``/``model_card.json``) and registers it; nothing is pickled. Loading:
  :func:`load_registered_backbone` (``models:/gfm-foundation@champion`` -> the timm backbone, through
  :func:`gfm_core.models.backbones.load_backbone`), or ``mlflow.pyfunc.load_model(...)`` whose ``predict``
  maps ``[B, C, H, W]`` float32 (normalised as the card says) to pooled ``[B, D]`` features. The logged model
  needs no gfm_core: its code is a standalone file and its ``requirements.txt`` pins what that file imports,
  so ``mlflow models serve`` runs it from an environment built from those requirements alone.
- **Promotion.** :func:`promote` runs the gate of :mod:`gfm_core.registry` (baselines, paired bootstrap of the
  ARP gain over the champion) and records the decision and its numbers as version tags.

Modules: :mod:`~gfm_core.tracking.runs` (experiment, runs, logging, UI links), :mod:`~gfm_core.tracking.card`
(the model card), :mod:`~gfm_core.tracking.registered_model` (the pyfunc model: register, load),
:mod:`~gfm_core.tracking.promotion` (the gate, with evidence and metrics logged).
"""

from gfm_core.registry import PromotionDecision
from gfm_core.tracking.card import card_markdown, model_card
from gfm_core.tracking.promotion import promote
from gfm_core.tracking.registered_model import (
    ARTIFACT_DIR,
    MODEL_CODE,
    MODEL_REQUIREMENTS,
    load_registered_backbone,
    register_backbone,
)
from gfm_core.tracking.runs import (
    PIPELINE_TAG,
    MlflowCallback,
    callbacks,
    configure,
    git_sha,
    log_artifacts,
    log_metrics,
    model_version_url,
    pipeline_run,
    run_url,
    stage_run,
)

__all__ = [
    "ARTIFACT_DIR",
    "MODEL_CODE",
    "MODEL_REQUIREMENTS",
    "PIPELINE_TAG",
    "MlflowCallback",
    "PromotionDecision",
    "callbacks",
    "card_markdown",
    "configure",
    "git_sha",
    "load_registered_backbone",
    "log_artifacts",
    "log_metrics",
    "model_card",
    "model_version_url",
    "pipeline_run",
    "promote",
    "register_backbone",
    "run_url",
    "stage_run",
]
