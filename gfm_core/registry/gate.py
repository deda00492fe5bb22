"""The gate's verdict on one candidate version: baselines, weights, and the comparison with the champion.

Reads the registry, writes nothing (:func:`gfm_core.registry.promotion.promote` records the verdict).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

from gfm_core.config import PromoteCfg
from gfm_core.errors import CheckpointError
from gfm_core.registry.comparison import ArpDifference, arp_difference
from gfm_core.registry.evidence import EVIDENCE_DIR, Evaluation, TaskEvidence, load_evidence

TAG_PREFIX = "gfm."


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict on one candidate version, and the numbers behind it.

    ``method``: ``first`` (no champion yet), ``bootstrap`` (paired ARP interval against the champion's
    evidence) or ``point`` (the champion has no evidence: ARP point estimates).
    """

    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    candidate_arp: float = math.nan
    champion_version: str | None = None
    champion_arp: float | None = None
    baseline_arps: dict[str, float] = field(default_factory=dict)
    method: str = "first"
    arp_diff: ArpDifference | None = None

    def tags(self) -> dict[str, str]:
        """The version tags that record the decision (``gfm.gate`` itself is written last, separately)."""
        t = {
            "gfm.arp": f"{self.candidate_arp:.6g}",
            "gfm.gate_method": self.method,
            "gfm.gate_reasons": "; ".join(self.reasons) or "beats every baseline and the champion",
            "gfm.champion_before": self.champion_version or "none",
            **{f"gfm.arp.{k}": f"{v:.6g}" for k, v in self.baseline_arps.items()},
        }
        if self.champion_arp is not None:
            t["gfm.champion_arp"] = f"{self.champion_arp:.6g}"
        if self.arp_diff is not None:
            d = self.arp_diff
            t.update({
                "gfm.arp_diff": f"{d.diff:.6g}", "gfm.arp_diff_lo": f"{d.lo:.6g}", "gfm.arp_diff_hi": f"{d.hi:.6g}",
                "gfm.arp_diff_ci": f"{d.ci:g}", "gfm.arp_diff_n_bootstrap": str(d.n_bootstrap),
                "gfm.arp_diff_tasks": ",".join(d.tasks),
            })
        return t


def version_at_alias(client: Any, name: str, alias: str) -> Any | None:
    """The model version ``models:/<name>@<alias>`` points at, or None when the alias (or the model) is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def _weights_reasons(client: Any, name: str, version: str, evaluation: Evaluation) -> list[str]:
    """Why the registered weights of ``version`` are not the ones the evaluation judged (empty when they are)."""
    rerun = (f"re-run `gfm finetune --model {evaluation.candidate}` and `gfm evaluate` on this backbone, "
             f"then `gfm promote`")
    registered = client.get_model_version(name, version).tags.get("gfm.weights_sha256")
    judged = evaluation.weights_sha256
    if not judged:
        return [f"the evaluation does not record which backbone bytes {evaluation.candidate} was fine-tuned from "
                f"(results written before backbone hashes were recorded); {rerun}"]
    if not registered:
        return [f"models:/{name}/{version} has no gfm.weights_sha256 tag (not registered with "
                f"tracking.register_backbone); register the backbone again with `gfm promote`"]
    if registered != judged:
        return [f"models:/{name}/{version} holds backbone sha256 {registered}, but the evaluation judged "
                f"fine-tuning results of sha256 {judged}: the backbone changed after fine-tuning; {rerun}"]
    return []


def decide(
    client: Any,
    name: str,
    version: str,
    evaluation: Evaluation,
    cfg: PromoteCfg,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> PromotionDecision:
    """The gate's verdict (reads the registry, writes nothing).

    Besides the ARP rules (:mod:`gfm_core.registry`) the registered weights must be the evaluated ones: the version's
    ``gfm.weights_sha256`` tag (the bytes :func:`gfm_core.tracking.register_backbone` logged) must equal
    ``evaluation.weights_sha256`` (the bytes the candidate's fine-tuning started from).
    """
    arp = evaluation.arp
    cand = arp.get(evaluation.candidate, math.nan)
    bar = cfg.must_beat if cfg.must_beat is not None else [m for m in arp if m != evaluation.candidate]
    others = {m: arp.get(m, math.nan) for m in bar if m != evaluation.candidate}
    reasons = _weights_reasons(client, name, version, evaluation)
    if not math.isfinite(cand):
        reasons.append(f"no ARP for candidate {evaluation.candidate!r} in the evaluation")
    for m, v in sorted(others.items()):
        if math.isfinite(v) and not cand > v:
            reasons.append(f"ARP {cand:+.2f} does not beat baseline {m} ({v:+.2f})")
        elif not math.isfinite(v) and (cfg.require_complete or m not in arp):
            reasons.append(f"baseline {m} was not evaluated (no ARP; promote.must_beat names it)")
    if evaluation.missing and cfg.require_complete:
        reasons.append(f"evaluation is incomplete: {len(evaluation.missing)} missing result(s)")

    current = version_at_alias(client, name, cfg.alias)
    method, champ_version, champ_arp, diff = "first", None, None, None
    if current is not None and str(current.version) != str(version):
        champ_version = str(current.version)
        method, champ_arp, diff, why = _against_champion(client, name, current, evaluation, cfg,
                                                         n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        reasons += why
    elif current is not None:  # the candidate already is the champion: nothing to decide
        return PromotionDecision(str(version), False, [f"v{version} already holds @{cfg.alias}; nothing changed"],
                                 cand, str(current.version), None, {}, "already-champion")
    return PromotionDecision(
        str(version), not reasons, reasons, cand, champ_version, champ_arp,
        {m: v for m, v in others.items() if math.isfinite(v)}, method, diff,
    )


def _against_champion(
    client: Any,
    name: str,
    current: Any,
    evaluation: Evaluation,
    cfg: PromoteCfg,
    *,
    n_bootstrap: int,
    ci: float,
    seed: int,
) -> tuple[str, float | None, ArpDifference | None, list[str]]:
    """``(method, champion ARP, ARP difference, reasons)`` of the candidate against the champion ``current``.

    ``bootstrap`` when the champion has stored evidence (paired interval of the candidate's ARP with the champion
    as the baseline: :mod:`gfm_core.registry.comparison`), else ``point`` (its ``gfm.arp`` tag).
    """
    cand = evaluation.arp.get(evaluation.candidate, math.nan)
    champ_version = str(current.version)
    reasons: list[str] = []
    run_id = current.tags.get("gfm.evidence_run_id")
    if run_id:
        champ_ev = read_version_evidence(client, name, champ_version, run_id)
        diff, why = arp_difference(evaluation.evidence, champ_ev, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        if diff is None:
            return "bootstrap", None, None, [f"cannot compare with champion v{champ_version}: {w}" for w in why]
        if not diff.lo > cfg.min_gain:
            reasons.append(
                f"relative gain over champion v{champ_version} (ARP with the champion as baseline) is "
                f"{diff.diff:+.2f} with {diff.ci:.0%} interval [{diff.lo:+.2f}, {diff.hi:+.2f}]; its lower bound "
                f"must exceed {cfg.min_gain:+.2f}"
            )
        raw = current.tags.get("gfm.arp")  # the champion's ARP when it was judged (against its own baseline)
        return "bootstrap", float(raw) if raw is not None else None, diff, reasons
    raw = current.tags.get("gfm.arp")
    champ_arp = float(raw) if raw is not None else None
    if champ_arp is None or not math.isfinite(champ_arp):
        reasons.append(f"champion v{champ_version} has neither evidence nor an ARP tag to compare with")
    elif not cand > champ_arp + cfg.min_gain:
        reasons.append(
            f"ARP {cand:+.2f} does not beat champion v{champ_version}'s {champ_arp:+.2f} by "
            f"{cfg.min_gain} (point estimates: the champion has no stored evidence)"
        )
    return "point", champ_arp, None, reasons


def read_version_evidence(client: Any, name: str, champ_version: str, run_id: str) -> dict[str, TaskEvidence]:
    """The champion's evidence, read from the artifacts (``evidence/``) of the run ``run_id`` that judged it."""
    with tempfile.TemporaryDirectory(prefix="gfm-evidence-") as tmp:
        try:
            local = client.download_artifacts(run_id, EVIDENCE_DIR, tmp)
        except Exception as e:  # run or artifacts gone
            raise CheckpointError(
                f"models:/{name}/{champ_version}: its evidence (run {run_id}, artifacts {EVIDENCE_DIR}/) "
                f"cannot be read ({type(e).__name__}: {e})"
            ) from e
        return load_evidence(local)
