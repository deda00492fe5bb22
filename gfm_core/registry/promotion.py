"""Promotion: judge a version in its turn, record the verdict as version tags, and move the alias on a pass."""

from __future__ import annotations

import logging
import time
from typing import Any

from gfm_core.config import PromoteCfg
from gfm_core.registry.evidence import Evaluation
from gfm_core.registry.gate import PromotionDecision, decide, version_at_alias
from gfm_core.registry.lock import LEASE_S, RegistryConflictError, promotion_turn

log = logging.getLogger(__name__)


def promote(
    client: Any,
    name: str,
    version: str,
    evaluation: Evaluation,
    cfg: PromoteCfg,
    *,
    evidence_run_id: str | None = None,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    lease_s: float = LEASE_S,
) -> PromotionDecision:
    """Judge ``version`` of ``name`` on ``evaluation``; record the decision as version tags; alias it on a pass.

    The decision runs inside :func:`promotion_turn`, so concurrent promotions are judged one after the other,
    each against the champion the previous one left. A version that already holds the alias is not judged
    again (its tags stay those of the decision that made it champion).

    Args:
        client: an ``mlflow.MlflowClient`` on the registry.
        evidence_run_id: the run holding the candidate's evidence under ``evidence/`` (see
            :func:`save_evidence`); recorded so that a later candidate can be compared with this one.
        lease_s: see :func:`promotion_turn`.

    Raises:
        RegistryConflictError: the alias moved while deciding, or the turn's lease ran out (nothing was aliased;
            run the promotion again).
    """
    with promotion_turn(client, name, client.get_model_version(name, version), lease_s=lease_s) as ticket:
        decision = decide(client, name, version, evaluation, cfg, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        if decision.method == "already-champion":
            log.info("models:/%s/%s already holds @%s: not judged again", name, version, cfg.alias)
            return decision
        tags = {**decision.tags(), "gfm.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "gfm.promotion_ticket": f"{ticket.ledger}/{ticket.number}"}
        if evidence_run_id:
            tags["gfm.evidence_run_id"] = evidence_run_id
        client.set_model_version_tag(name, version, "gfm.gate", "pending")
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v[:5000])
        if not decision.promoted:
            client.set_model_version_tag(name, version, "gfm.gate", "refused")
            log.info("models:/%s/%s refused: %s", name, version, "; ".join(decision.reasons))
            return decision

        ticket.check(client)
        now = version_at_alias(client, name, cfg.alias)
        now_version = str(now.version) if now is not None else None
        if now_version != decision.champion_version:  # a writer outside the turns (by hand, an old client)
            client.set_model_version_tag(name, version, "gfm.gate", "conflict")
            raise RegistryConflictError(
                f"models:/{name}@{cfg.alias} moved from {decision.champion_version} to {now_version} while "
                f"v{version} was judged; nothing was aliased, run the promotion again"
            )
        client.set_registered_model_alias(name, cfg.alias, version)
        try:
            client.set_model_version_tag(name, version, "gfm.gate", "passed")
            if decision.champion_version:
                client.set_model_version_tag(name, decision.champion_version, "gfm.superseded_by", str(version))
        except BaseException:
            if decision.champion_version:  # undo: the alias never points at a version without its verdict
                client.set_registered_model_alias(name, cfg.alias, decision.champion_version)
            else:
                client.delete_registered_model_alias(name, cfg.alias)
            raise
    log.info("models:/%s/%s is now @%s", name, version, cfg.alias)
    return decision
