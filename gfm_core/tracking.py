"""MLflow: stage runs, per-step metrics, the ``gfm-foundation`` registry and gated promotion by alias.

The only module that imports mlflow (lazily). The default store is sqlite plus local artifacts under
``outputs/``; a tracking server is one setting (``tracking.uri``).

- **Runs.** :func:`pipeline_run` opens (or resumes) one parent run per pipeline execution, keyed by a tag
  (the Dagster run id, or one ``gfm demo``); :func:`stage_run` opens a nested run per stage with the stage's
  params section flattened into MLflow params; :class:`MlflowCallback` sends every logged training step.
- **Registry.** :func:`register_backbone` logs the exported backbone as an MLflow *pyfunc model from code*
  (``backbone/``: ``MLmodel``, ``code.py``, ``artifacts/backbone.safetensors`` + its JSON sidecar, and
  ``model_card.md``/``model_card.json``) and registers it; nothing is pickled. Loading:
  :func:`load_registered_backbone` (``models:/gfm-foundation@champion`` -> the timm backbone, through
  :func:`gfm_core.models.weights.load_backbone`), or ``mlflow.pyfunc.load_model(...)`` whose ``predict``
  maps ``[B, C, H, W]`` float32 (normalised as the card says) to pooled ``[B, D]`` features. The logged model
  needs no gfm_core: its code is a standalone file and its ``requirements.txt`` pins what that file imports,
  so ``mlflow models serve`` runs it from an environment built from those requirements alone.
- **Promotion.** :func:`promote` runs the gate of :mod:`gfm_core.registry` (baselines, paired bootstrap of the
  ARP gain over the champion) and records the decision and its numbers as version tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gfm_core.config import Params, PromoteCfg, TrackingCfg
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import sha256_file
from gfm_core.registry import EVIDENCE_DIR, Evaluation, PromotionDecision, save_evidence
from gfm_core.registry import promote as _gate_and_alias

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ARTIFACT_DIR = "backbone"
PIPELINE_TAG = "gfm.pipeline_key"
_STATE: dict[str, str] = {}  # the experiment selected by configure()

#: The pyfunc model's code (MLflow "models from code": this file is stored with the model, nothing is pickled).
#: Self-contained: it imports only what the model's requirements list (MODEL_REQUIREMENTS + mlflow), never
#: gfm_core, so the model serves from an environment built from its own requirements.txt.
MODEL_CODE = '''"""gfm-foundation backbone as an MLflow pyfunc: [B, C, H, W] float32 -> pooled [B, D] features.

Needs torch, torchvision, timm, safetensors, numpy and mlflow only (see requirements.txt).
"""
import hashlib
import json

import mlflow
import numpy as np


class GfmBackbone(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import timm
        from safetensors.torch import load_file

        path = context.artifacts["backbone"]
        with open(context.artifacts["sidecar"]) as f:
            side = json.load(f)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if side.get("weights_sha256") not in (None, h.hexdigest()):
            raise ValueError(f"{path}: sha256 {h.hexdigest()} is not the sidecar's {side['weights_sha256']}")
        model = timm.create_model(side["arch"], pretrained=False, **side["timm_kwargs"])
        model.load_state_dict(load_file(path), strict=True)
        self.model = model.eval()

    def predict(self, context, model_input, params=None):
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.model(x).numpy()


mlflow.models.set_model(GfmBackbone())
'''
#: What :data:`MODEL_CODE` imports besides mlflow (timm imports torchvision), pinned to the installed versions,
#: which pyproject.toml pins.
MODEL_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy")


def _mlflow() -> Any:
    import mlflow

    return mlflow


def configure(cfg: TrackingCfg) -> None:
    """Point MLflow at ``cfg.uri`` (creating the local store's folders) and select the experiment."""
    mlflow = _mlflow()
    if cfg.uri.startswith("sqlite:///"):
        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_registry_uri(cfg.uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = None
        if not cfg.uri.startswith(("http://", "https://", "databricks")):  # a server picks its own store
            cfg.artifacts.mkdir(parents=True, exist_ok=True)
            location = cfg.artifacts.resolve().as_uri()
        with contextlib.suppress(Exception):  # created by a concurrent process in between
            mlflow.create_experiment(cfg.experiment, artifact_location=location)
    _STATE["experiment_id"] = mlflow.set_experiment(cfg.experiment).experiment_id


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


@contextlib.contextmanager
def pipeline_run(key: str, name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution, found by ``gfm.pipeline_key = key`` or created; yields its id.

    Each stage of a pipeline (possibly in another process) enters it again, so its stage runs nest under one
    parent. Two processes that create it at once both keep the oldest one.
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    exp_id = _STATE.get("experiment_id")
    if exp_id is None:
        raise ConfigError("pipeline_run: no MLflow experiment selected (call tracking.configure first)")

    def find() -> list[Any]:
        return client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'",
                                  order_by=["attributes.start_time ASC"], max_results=5)

    found = find()
    if not found:
        run = client.create_run(exp_id, run_name=name, tags={PIPELINE_TAG: key, "gfm.stage": "pipeline",
                                                                         **(tags or {})})
        found = find()
        if found and found[0].info.run_id != run.info.run_id:  # another process won the race: use its run
            client.delete_run(run.info.run_id)
    run_id = found[0].info.run_id if found else run.info.run_id
    with mlflow.start_run(run_id=run_id) as run:
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """An MLflow run for one stage (nested under the active pipeline run, if any); yields its run id."""
    mlflow = _mlflow()
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, nested=nested, tags={"gfm.stage": name, **(tags or {})}) as run:
        flat = _flat("", params, {})
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i : i + 100]))
        yield run.info.run_id


def run_url(run_id: str, ui_url: str | None = None) -> str | None:
    """The MLflow UI page of a run: on the tracking server, or on ``ui_url`` (``mlflow ui`` on the local store)."""
    mlflow = _mlflow()
    uri = mlflow.get_tracking_uri()
    base = uri if uri.startswith(("http://", "https://")) else ui_url
    if not base:
        return None
    exp_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def model_version_url(name: str, version: str, ui_url: str | None = None) -> str | None:
    """The MLflow UI page of a registered model version (see :func:`run_url`)."""
    uri = _mlflow().get_tracking_uri()
    base = uri if uri.startswith(("http://", "https://")) else ui_url
    return f"{base.rstrip('/')}/#/models/{name}/versions/{version}" if base else None


class MlflowCallback:
    """``fit`` callback: every logged step's metrics go to the active MLflow run."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        _mlflow().log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        _mlflow().set_tags({"gfm.last_checkpoint": str(path), "gfm.last_checkpoint_step": str(step)})


def callbacks() -> list[Any]:
    """``[MlflowCallback()]`` inside an active run, else none (stages run untracked outside one)."""
    with contextlib.suppress(ImportError):
        if _mlflow().active_run() is not None:
            return [MlflowCallback()]
    return []


def log_metrics(metrics: Mapping[str, Any], prefix: str = "", step: int | None = None) -> None:
    """Finite numbers of ``metrics`` to the active run (at ``step``, if given)."""
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if clean and _mlflow().active_run() is not None:
        _mlflow().log_metrics(clean, step=step)


def log_artifacts(paths: Mapping[str, Path | None], artifact_path: str | None = None) -> None:
    """Log existing files or folders to the active run (missing ones are skipped; there is nothing to log)."""
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        return
    for path in paths.values():
        if path is None or not Path(path).exists():
            continue
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{Path(path).name}"
                                 if artifact_path else Path(path).name)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def git_sha() -> str:
    """The checkout's commit (``unknown`` outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------ registry


def model_card(backbone: Path, params: Params | None = None, metrics: Mapping[str, Any] | None = None) -> dict:
    """What a user of the backbone needs: architecture, input, bands, GSD, normalisation, lineage, metrics.

    From the export's sidecar; with ``params``, also the pile's sources (bands, GSD ranges) and the per-band
    normalisation statistics of the pile (``<ingest.out_dir>/norm_stats.json``).
    """
    side = json.loads(backbone.with_suffix(".json").read_text())
    pcfg = side.get("pretrained_cfg", {})
    meta = side.get("meta", {})
    card: dict[str, Any] = {
        "architecture": side.get("arch"),
        "timm_kwargs": side.get("timm_kwargs", {}),
        "input_size": pcfg.get("input_size"),
        "normalisation": {"mean": pcfg.get("mean"), "std": pcfg.get("std"),
                          "scale": "pixels in [0, 1] (8-bit DN / 255), then (x - mean) / std"},
        "teacher": meta.get("teacher", {}),
        "data": meta.get("data", {}),
        "pretraining_steps": meta.get("steps"),
        "pretraining_loss": meta.get("loss", {}),
        "weights_sha256": side.get("weights_sha256"),
    }
    if params is not None:
        card["bands"] = {
            s.name: {"bands": list(s.bands) if getattr(s, "bands", None) else "all (RGB)",
                     "gsd_m": list(s.gsd_range) if getattr(s, "gsd_range", None) else "unknown"}
            for s in params.ingest.pile_sources()
        }
        stats = params.ingest.out_dir / "norm_stats.json"
        if stats.is_file():
            card["pile_norm_stats"] = json.loads(stats.read_text())
    if metrics:
        card["metrics"] = dict(metrics)
    return card


def card_markdown(card: Mapping[str, Any], title: str = "gfm-foundation") -> str:
    """The model card as markdown (the registered version's description)."""
    lines = [f"# {title}", ""]
    for key, value in card.items():
        if isinstance(value, Mapping):
            lines.append(f"**{key}**")
            lines += [f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
            lines.append("")
        else:
            lines.append(f"**{key}**: {value}")
            lines.append("")
    return "\n".join(lines)


def _signature(card: Mapping[str, Any]) -> Any:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = card.get("input_size") or [3, -1, -1]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *[int(s) for s in size]))]))


def register_backbone(
    backbone: Path, model_name: str, tags: Mapping[str, str], *, card: Mapping[str, Any] | None = None
) -> str:
    """Log the backbone as a pyfunc model (with its model card) to the active run, register it; returns the version.

    The version's source is ``<run artifacts>/backbone``; its description is the model card. Its tag
    ``gfm.weights_sha256`` is the sha256 of the weight file as logged (what the promotion gate compares with
    the evaluated bytes). The model is self-contained (:data:`MODEL_CODE`, :data:`MODEL_REQUIREMENTS`).
    """
    mlflow = _mlflow()
    run = mlflow.active_run()
    if run is None:
        raise ConfigError("register_backbone needs an active MLflow run (use tracking.stage_run)")
    backbone = Path(backbone)
    sidecar = backbone.with_suffix(".json")
    for f in (backbone, sidecar):
        if not f.is_file():
            raise CheckpointError(f"{f}: exported backbone file not found (run `gfm pretrain` first)")
    card = dict(card) if card is not None else model_card(backbone)
    import importlib.metadata as md

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="gfm-model-") as tmp:
        code = Path(tmp) / "gfm_backbone_model.py"
        code.write_text(MODEL_CODE)
        model_dir = Path(tmp) / ARTIFACT_DIR
        reqs = [f"{p}=={md.version(p)}" for p in MODEL_REQUIREMENTS]
        with warnings.catch_warnings():  # "add type hints" / "no input example": the signature is explicit
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(model_dir), python_model=str(code), signature=_signature(card), pip_requirements=reqs,
                artifacts={"backbone": str(backbone), "sidecar": str(sidecar)},
            )
        (model_dir / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (model_dir / "model_card.md").write_text(card_markdown(card, model_name))
        logged = sha256_file(model_dir / "artifacts" / backbone.name)  # the bytes registered, not the source's
        mlflow.log_artifacts(str(model_dir), artifact_path=ARTIFACT_DIR)
    tags = dict(tags)
    if tags.get("gfm.weights_sha256", logged) != logged:
        log.warning("%s changed while it was registered: the version is tagged with the logged bytes' sha256",
                    backbone)
    tags["gfm.weights_sha256"] = logged
    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):  # already registered
        client.create_registered_model(model_name, description="GFM foundation backbones (timm, safetensors)")
    version = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run.info.run_id, tags=tags,
        description=card_markdown(card, model_name)[:5000],
    )
    return str(version.version)


def promote(
    version: str,
    report: Any,
    cfg: PromoteCfg,
    *,
    params: Params | None = None,
    evaluation: Evaluation | None = None,
) -> PromotionDecision:
    """Judge ``version`` with the gate of :mod:`gfm_core.registry`; tag it; move ``cfg.alias`` only on a pass.

    With ``params`` (or a ready ``evaluation``), the candidate's per-sample results are logged to the active
    run as evidence (``evidence/``) and compared with the champion's by a paired bootstrap of the ARP gain.
    Without either, only ARP point estimates are known: the gate then compares with a champion's ``gfm.arp``
    tag, and refuses when the champion has evidence (a point estimate cannot show the interval).
    """
    mlflow = _mlflow()
    if evaluation is None and params is not None:
        evaluation = Evaluation.from_report(report, params, cfg.candidate)
    if evaluation is None:
        evaluation = Evaluation(
            cfg.candidate, {m: float(v) for m, v in report.arp.items()}, getattr(report, "baseline", ""), {}, {},
            tuple(getattr(report, "missing", ())), getattr(report, "backbones", {}).get(cfg.candidate),
        )
    run = mlflow.active_run()
    evidence_run = None
    if run is not None and evaluation.evidence:
        with tempfile.TemporaryDirectory(prefix="gfm-evidence-") as tmp:
            mlflow.log_artifacts(str(save_evidence(evaluation, tmp)), artifact_path=EVIDENCE_DIR)
        evidence_run = run.info.run_id
    stats = params.evaluate if params is not None else None
    decision = _gate_and_alias(
        mlflow.MlflowClient(), cfg.model_name, str(version), evaluation, cfg, evidence_run_id=evidence_run,
        n_bootstrap=stats.n_bootstrap if stats else 1000, ci=stats.ci if stats else 0.95,
        seed=stats.seed if stats else 0,
    )
    if run is not None:
        log_metrics({"gate.promoted": float(decision.promoted), "gate.candidate_arp": decision.candidate_arp,
                     **({"gate.arp_diff": decision.arp_diff.diff, "gate.arp_diff_lo": decision.arp_diff.lo,
                         "gate.arp_diff_hi": decision.arp_diff.hi} if decision.arp_diff else {})})
    return decision


def load_registered_backbone(uri: str) -> Any:
    """A timm backbone from a registry URI such as ``models:/gfm-foundation@champion``."""
    from gfm_core.models.weights import load_backbone

    local = Path(_mlflow().artifacts.download_artifacts(uri))
    files = sorted(local.rglob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{uri}: no .safetensors backbone among the registered artifacts ({local})")
    return load_backbone(files[0])


__all__ = [
    "ARTIFACT_DIR",
    "MODEL_CODE",
    "MODEL_REQUIREMENTS",
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
