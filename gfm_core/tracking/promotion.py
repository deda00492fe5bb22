"""Promotion through the tracking store: log the candidate's evidence, run the gate, log its numbers."""

from __future__ import annotations

import tempfile
from typing import Any

from gfm_core.config import Params, PromoteCfg
from gfm_core.registry import EVIDENCE_DIR, Evaluation, PromotionDecision, save_evidence
from gfm_core.registry import promote as _gate_and_alias
from gfm_core.tracking.runs import import_mlflow, log_metrics


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
    mlflow = import_mlflow()
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
