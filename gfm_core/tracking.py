"""MLflow: stage runs, per-step metrics, the ``gfm-foundation`` registry and gated promotion by alias.

The only module that imports mlflow. The default store is sqlite plus local artifacts under ``outputs/``; a
tracking server is one setting (``tracking.uri``). Registry updates are single MLflow calls whose order keeps
the registry consistent: a version is tagged with the gate's decision and numbers *before* the alias moves, so
``@champion`` only ever points at a version whose tags say why it won.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfm_core.config import PromoteCfg, TrackingCfg
from gfm_core.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ARTIFACT_DIR = "backbone"


def _mlflow() -> Any:
    import mlflow

    return mlflow


def configure(cfg: TrackingCfg) -> None:
    """Point MLflow at ``cfg.uri`` (creating the local store's folders) and select the experiment."""
    mlflow = _mlflow()
    if cfg.uri.startswith("sqlite:///"):
        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        cfg.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(cfg.experiment, artifact_location=cfg.artifacts.resolve().as_uri())
    mlflow.set_experiment(cfg.experiment)


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


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


class MlflowCallback:
    """``fit`` callback: every logged step's metrics go to the active MLflow run."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        _mlflow().log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        _mlflow().set_tag("gfm.last_checkpoint", str(path))


def callbacks() -> list[Any]:
    """``[MlflowCallback()]`` inside an active run, else none (stages run untracked outside one)."""
    with contextlib.suppress(ImportError):
        if _mlflow().active_run() is not None:
            return [MlflowCallback()]
    return []


def log_metrics(metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Finite numbers of ``metrics`` to the active run."""
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if clean and _mlflow().active_run() is not None:
        _mlflow().log_metrics(clean)


def git_sha() -> str:
    """The checkout's commit (``unknown`` outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def register_backbone(backbone: Path, model_name: str, tags: Mapping[str, str]) -> str:
    """Log the backbone (safetensors + sidecar) to the active run and register it; returns the version."""
    mlflow = _mlflow()
    run = mlflow.active_run()
    if run is None:
        raise ConfigError("register_backbone needs an active MLflow run (use tracking.stage_run)")
    sidecar = backbone.with_suffix(".json")
    for f in (backbone, sidecar):
        if not f.is_file():
            raise CheckpointError(f"{f}: exported backbone file not found (run `gfm pretrain` first)")
        mlflow.log_artifact(str(f), artifact_path=ARTIFACT_DIR)
    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):  # already registered
        client.create_registered_model(model_name, description="GFM foundation backbones (timm, safetensors)")
    version = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run.info.run_id, tags=dict(tags)
    )
    return str(version.version)


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict on one candidate version."""

    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    candidate_arp: float = math.nan
    champion_version: str | None = None
    champion_arp: float | None = None


def gate(report: Any, cfg: PromoteCfg, champion_arp: float | None) -> tuple[bool, list[str]]:
    """Does ``cfg.candidate`` beat every baseline (ARP) and the current champion (by ``min_gain``)?"""
    arp = report.arp
    if cfg.candidate not in arp or not math.isfinite(arp[cfg.candidate]):
        return False, [f"no ARP for candidate {cfg.candidate!r} in the evaluation report"]
    cand = arp[cfg.candidate]
    reasons = []
    for name, value in sorted(arp.items()):
        if name != cfg.candidate and math.isfinite(value) and not cand > value:
            reasons.append(f"ARP {cand:+.2f} does not beat baseline {name} ({value:+.2f})")
    if champion_arp is not None and not cand > champion_arp + cfg.min_gain:
        reasons.append(f"ARP {cand:+.2f} does not beat the champion's {champion_arp:+.2f} by {cfg.min_gain}")
    missing = getattr(report, "missing", [])
    if missing and cfg.require_complete:
        reasons.append(f"evaluation is incomplete: {len(missing)} missing result(s)")
    return not reasons, reasons


def promote(version: str, report: Any, cfg: PromoteCfg) -> PromotionDecision:
    """Tag ``version`` with the gate's numbers and decision; move ``cfg.alias`` to it only when it passes."""
    client = _mlflow().MlflowClient()
    champion_version, champion_arp = None, None
    with contextlib.suppress(Exception):  # no champion yet
        current = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
        champion_version = str(current.version)
        champion_arp = float(current.tags["gfm.arp"]) if "gfm.arp" in current.tags else None
    passed, reasons = gate(report, cfg, champion_arp)
    cand_arp = float(report.arp.get(cfg.candidate, math.nan))
    tags = {"gfm.arp": f"{cand_arp:.6g}", "gfm.gate": "passed" if passed else "refused",
            "gfm.gate_reasons": "; ".join(reasons) or "beats every baseline and the champion",
            "gfm.champion_before": champion_version or "none",
            **{f"gfm.arp.{k}": f"{v:.6g}" for k, v in report.arp.items() if math.isfinite(v)}}
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, version, k, v[:5000])
    if passed:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    return PromotionDecision(version, passed, reasons, cand_arp, champion_version, champion_arp)


def load_registered_backbone(uri: str) -> Any:
    """A timm backbone from a registry URI such as ``models:/gfm-foundation@champion``."""
    from gfm_core.models.backbones import load_backbone

    local = Path(_mlflow().artifacts.download_artifacts(uri))
    files = sorted(local.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{uri}: no .safetensors backbone among the registered artifacts ({local})")
    return load_backbone(files[0])
