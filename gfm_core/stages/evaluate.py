"""The evaluation stages: the comparison report over the fine-tuning results, and promotion in the registry
(register the candidate, move the alias only when the gate passes)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gfm_core.config import Params
from gfm_core.errors import ConfigError
from gfm_core.io import sha256_file


def run_evaluate(params: Params) -> Any:
    """The comparison report over the fine-tuning results: table, ARP, bootstrap CIs, radar chart."""
    from gfm_core.evaluation.report import run_evaluation

    return run_evaluation(params)


@dataclass(frozen=True)
class PromoteResult:
    """The registered version and the gate's decision."""

    model_name: str
    version: str
    promoted: bool
    reasons: list[str]
    candidate_arp: float
    champion_version: str | None

    def tracked_metrics(self) -> dict[str, float]:
        """What the stage logs (MLflow, Dagster): the same names whoever runs it."""
        return {"arp": self.candidate_arp, "promoted": float(self.promoted)}

    def tracked_files(self) -> dict[str, Path]:
        """The files the stage's tracked run keeps (the gate's evidence is logged by the gate itself)."""
        return {}


def lineage_tags(params: Params, backbone: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Where a backbone came from: data manifest hash, teacher (and the champion's), params hash, git sha, dvc.lock.

    With tracking on, the teacher of the version at ``promote.alias`` is recorded beside this one's
    (``gfm.previous_teacher*``, ``gfm.teacher_changed``): a version retrained on a new teacher shows the change.
    """
    from gfm_core import tracking

    side = json.loads(backbone.with_suffix(".json").read_text()).get("meta", {})
    tags = {
        "gfm.data_manifest": str(side.get("data", {}).get("manifest_content_hash", "unknown")),
        "gfm.teacher": str(side.get("teacher", {}).get("arch", "none")),
        "gfm.teacher_sha256": str(side.get("teacher", {}).get("sha256", "none")),
        "gfm.params_sha256": str(side.get("params_sha256", "unknown")),
        "gfm.git_sha": tracking.git_sha(),
        "gfm.weights_sha256": sha256_file(backbone),
    }
    if params.tracking.enabled:
        tags.update(previous_teacher_tags(params, tags["gfm.teacher_sha256"]))
    return {**tags, **dvc_lineage(backbone), **(extra or {})}


def previous_teacher_tags(params: Params, teacher_sha256: str) -> dict[str, str]:
    """The teacher of the current ``promote.alias`` version (``none`` before the first); reads the registry.

    The version the gate actually compared with is ``gfm.champion_before`` (the alias may move in between).
    """
    import mlflow

    from gfm_core.registry.gate import version_at_alias

    champion = version_at_alias(mlflow.MlflowClient(), params.promote.model_name, params.promote.alias)
    if champion is None:
        return {"gfm.previous_teacher": "none", "gfm.previous_teacher_sha256": "none",
                "gfm.previous_teacher_version": "none", "gfm.teacher_changed": "false"}
    sha = str(champion.tags.get("gfm.teacher_sha256", "unknown"))
    return {"gfm.previous_teacher": str(champion.tags.get("gfm.teacher", "unknown")),
            "gfm.previous_teacher_sha256": sha, "gfm.previous_teacher_version": str(champion.version),
            "gfm.teacher_changed": str(sha != teacher_sha256).lower()}


def dvc_lineage(backbone: Path, lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """``gfm.dvc_lock_sha256`` and ``gfm.dvc_stage`` when ``lock`` records this very file as a stage output.

    A backbone trained outside DVC (or retrained since the last ``dvc repro``) gets no DVC tags.
    """
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{lock}: not a readable dvc.lock ({e})") from e
    target = backbone.resolve()
    for name, stage in stages.items():
        for out in stage.get("outs", []) or []:
            if (lock.parent / out.get("path", "")).resolve() != target:
                continue
            md5 = hashlib.md5(usedforsecurity=False)
            with open(backbone, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    md5.update(chunk)
            if out.get("md5") == md5.hexdigest():
                return {"gfm.dvc_lock_sha256": sha256_file(lock), "gfm.dvc_stage": name}
    return {}


def _finite(v: float | None) -> float | None:
    """A score for JSON: rounded, None when missing or NaN."""
    return round(v, 4) if v is not None and math.isfinite(v) else None


def run_promote(params: Params, *, report: Any = None, tags: dict[str, str] | None = None) -> PromoteResult:
    """Register the candidate backbone as a new ``promote.model_name`` version; alias it only if the gate passes.

    Runs inside the caller's active MLflow run (``gfm promote``, ``gfm demo`` and the Dagster asset open one named
    ``promote``): the version's evidence is logged there.

    The gate (:mod:`gfm_core.registry`): the candidate's ARP beats every other evaluated model, and the paired
    bootstrap interval of its ARP gain over the current champion lies above ``promote.min_gain``.
    """
    from gfm_core import tracking

    cfg = params.promote
    if not params.tracking.enabled:
        raise ConfigError("tracking.enabled is false: promotion needs the MLflow registry")
    tracking.configure(params.tracking)
    if tracking.runs.import_mlflow().active_run() is None:
        raise ConfigError("promotion runs inside an MLflow run that keeps the gate's evidence: open one first "
                          "(tracking.stage_run('promote', ...)), as gfm promote, gfm demo and the Dagster asset do")
    report = report if report is not None else run_evaluate(params)
    spec = params.model(cfg.candidate)
    if spec.path is None or spec.kind != "export":
        raise ConfigError(f"promote.candidate {cfg.candidate!r} must be an exported backbone (kind: export)")
    table = {m: {t: _finite(report.mean[m].get(f"{t}/{report.headlines[t]}")) for t in report.tasks}
             for m in report.models}
    card = tracking.model_card(spec.path, params, metrics={f"arp.{m}": v for m, v in report.arp.items()},
                               evaluation={"headlines": dict(report.headlines), "scores": table})
    version = tracking.register_backbone(spec.path, cfg.model_name, lineage_tags(params, spec.path, tags), card=card)
    decision = tracking.promote(version, report, cfg, params=params)
    return PromoteResult(cfg.model_name, version, decision.promoted, decision.reasons, decision.candidate_arp,
                         decision.champion_version)
