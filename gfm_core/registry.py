"""The promotion gate: ``@champion`` moves to a candidate only when it beats the champion *and* the baselines.

The rule, for the candidate (``promote.candidate``, the foundation model just trained) and an evaluation
report over the same tasks:

1. its ARP beats the ARP of every model in ``promote.must_beat`` (default: every other evaluated model: ImageNet,
   random init, ablations, the trivial row);
2. it beats the current champion: the paired bootstrap interval of ``ARP(candidate) - ARP(champion)`` lies
   above ``promote.min_gain`` (its lower bound is greater). Both models are scored on the *same* test samples
   and seeds; each replicate resamples the samples (and seeds) of every task with replacement and recomputes
   each task's headline metric from per-sample statistics (:mod:`gfm_core.evaluation.metrics`). ARP is taken
   against the current evaluation's baseline scores, so the difference is
   ``mean_t 100 * (s_cand_t - s_champ_t) / |s_base_t|``;
3. the evaluation is complete when ``promote.require_complete`` is set.

The champion's per-sample statistics (its *evidence*) are stored as artifacts of the promotion run that
judged it (``evidence/``: ``evidence.json`` + one ``.npz`` of numeric arrays per task and seed, no pickles),
named by the version tag ``gfm.evidence_run_id``. A champion registered without evidence is compared on its
recorded ARP point estimate (tag ``gfm.arp``), and the decision says so (``gfm.gate_method``). Evidence that
does not cover the candidate's tasks and test samples cannot show the candidate is better: the gate refuses.

The gate binds to bytes: it refuses a version whose registered weights (tag ``gfm.weights_sha256``, hashed
from the logged artifact) are not the backbone the candidate's fine-tuning results started from.

Concurrent promotions are serialised (:func:`promotion_turn`, a ticket lock on the registry itself, so it
holds for a sqlite store and a tracking server alike): each is judged against the champion the previous
one left. Registry writes keep a consistent state: the version is tagged ``gfm.gate=pending`` first, then
with its numbers; the alias moves only after the current champion is read again and found unchanged;
``gfm.gate`` is written last (``passed``/``refused``). A failure between the alias move and the final tag
moves the alias back. So ``@champion`` only ever points at a version whose tags say why it won, a refused
candidate never touches the alias, and a champion judged again keeps its tags.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.config import Params, PromoteCfg
from gfm_core.errors import CheckpointError, ConfigError, GfmError

log = logging.getLogger(__name__)

EVIDENCE_DIR = "evidence"
EVIDENCE_FILE = "evidence.json"
EVIDENCE_SCHEMA = "gfm.promotion.evidence/1"
TAG_PREFIX = "gfm."
LEDGER_SUFFIX = ".promotions"  # <model>.promotions: the registered model whose versions are promotion tickets
TICKET_TAG = "gfm.ticket"  # open | done | expired
LEASE_S = 900.0  # the longest a promotion may hold its turn; a crashed one blocks the others this long at most


class RegistryConflictError(GfmError):
    """The champion alias moved while a promotion was being decided."""


# ------------------------------------------------------------------------------------------------ evidence


@dataclass(frozen=True)
class TaskEvidence:
    """One model on one task: per-seed, per-sample statistics of the test split.

    Attributes:
        task, head, headline: the task, its head, and the metric ARP uses.
        ids: the test samples, in row order of every ``stats`` array.
        stats: seed -> statistic name -> ``[n_samples, ...]`` array (see ``metrics_from_stats``).
    """

    task: str
    head: str
    headline: str
    ids: tuple[str, ...]
    stats: dict[int, dict[str, np.ndarray]]

    def score(self, seeds: Sequence[int] | None = None) -> float:
        """The headline metric averaged over ``seeds`` (default all)."""
        from gfm_core.evaluation.metrics import metrics_from_stats

        use = sorted(self.stats) if seeds is None else list(seeds)
        return float(np.mean([metrics_from_stats(self.head, self.stats[s])[self.headline] for s in use]))


@dataclass(frozen=True)
class Evaluation:
    """What the gate needs of one evaluation report.

    Attributes:
        candidate: the model being judged (a row of the report).
        arp: model -> ARP (NaN = not evaluated).
        baseline: the ARP reference model; ``baseline_scores`` its headline score per task.
        evidence: task -> the candidate's :class:`TaskEvidence`.
        missing: results the report lacks.
        weights_sha256: the backbone bytes the candidate's fine-tuning results started from (None: unknown);
            the gate refuses a version whose registered weights differ.
    """

    candidate: str
    arp: dict[str, float]
    baseline: str
    baseline_scores: dict[str, float]
    evidence: dict[str, TaskEvidence]
    missing: tuple[str, ...] = ()
    weights_sha256: str | None = None

    @classmethod
    def from_report(cls, report: Any, params: Params, candidate: str | None = None) -> Evaluation:
        """Collect the candidate's per-sample results (``finetune.out_dir``) for the report's tasks and seeds.

        Raises:
            ConfigError: the candidate is not a model of the report, or the report pools it (pretraining seeds).
            CheckpointError: a result file the report used is gone, or the results changed since the report.
        """
        from gfm_core.evaluation.report import load_run
        from gfm_core.evaluation.results import RESULT_FILE, result_dir

        name = candidate or params.promote.candidate
        pooled = getattr(report, "pretrainings", {})
        if name in pooled or any(name in members for members in pooled.values()):
            raise ConfigError(
                f"promote.candidate {name!r}: the report pools it with other pretraining runs "
                f"(evaluate.pretraining_seeds {pooled}); the gate registers one backbone on the evidence of its "
                f"own results, so evaluate without pooling it (empty evaluate.pretraining_seeds), then promote"
            )
        if name not in report.models:
            raise ConfigError(f"promote.candidate {name!r} is not a model of the evaluation report {report.models}")
        evidence = {}
        shas: dict[str | None, list[str]] = {}
        scored = [t for t in report.tasks if t not in getattr(report, "arp_excluded", {})]  # ARP's own tasks
        for task in scored:
            seeds = report.seeds.get(name, {}).get(task, [])
            runs = [load_run(result_dir(params.finetune, task, name, s) / RESULT_FILE) for s in seeds]
            for r in runs:
                shas.setdefault(r.backbone_sha256, []).append(str(r.source))
            if not runs:
                continue
            ids = tuple(runs[0].ids)
            for r in runs[1:]:
                if tuple(r.ids) != ids:
                    raise CheckpointError(
                        f"{result_dir(params.finetune, task, name, r.seed)}: seed {r.seed} was tested on other "
                        f"samples than seed {runs[0].seed}; re-run its fine-tuning"
                    )
            evidence[task] = TaskEvidence(
                task, runs[0].head, runs[0].headline, ids, {r.seed: dict(r.stats) for r in runs}
            )
        reported = getattr(report, "backbones", {}).get(name)
        if len(shas) > 1 or (shas and reported is not None and reported not in shas):
            found = "; ".join(f"{k or 'unrecorded'}: {', '.join(v)}" for k, v in shas.items())
            raise CheckpointError(
                f"the fine-tuning results of {name} changed since the evaluation report (which used backbone "
                f"sha256 {reported}; now {found}); re-run `gfm evaluate`, then `gfm promote`"
            )
        base = {t: float(report.cell(report.baseline, t)) for t in scored}
        return cls(name, {m: float(v) for m, v in report.arp.items()}, report.baseline, base, evidence,
                   tuple(report.missing), next(iter(shas), reported))


def save_evidence(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write the candidate's evidence (``evidence.json`` + ``<task>/seed_<s>.npz``); returns ``out_dir``."""
    from gfm_core.io import write_bytes, write_json

    out = Path(out_dir)
    tasks = {}
    for task, ev in evaluation.evidence.items():
        for seed, stats in ev.stats.items():
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v) for k, v in stats.items()})
            write_bytes(out / task / f"seed_{seed}.npz", buf.getvalue())
        tasks[task] = {"head": ev.head, "headline": ev.headline, "ids": list(ev.ids), "seeds": sorted(ev.stats)}
    write_json(out / EVIDENCE_FILE, {
        "schema": EVIDENCE_SCHEMA, "model": evaluation.candidate, "tasks": tasks,
        "arp": {k: (v if math.isfinite(v) else None) for k, v in evaluation.arp.items()},
        "baseline": evaluation.baseline, "baseline_scores": evaluation.baseline_scores,
    })
    return out


def load_evidence(folder: str | Path) -> dict[str, TaskEvidence]:
    """Read what :func:`save_evidence` wrote.

    Raises:
        CheckpointError: a file is missing or not evidence.
    """
    folder = Path(folder)
    index = folder / EVIDENCE_FILE
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read promotion evidence ({e})") from e
    if meta.get("schema") != EVIDENCE_SCHEMA:
        raise CheckpointError(f"{index}: schema {meta.get('schema')!r}, expected {EVIDENCE_SCHEMA!r}")
    out = {}
    for task, t in meta["tasks"].items():
        stats = {}
        for seed in t["seeds"]:
            path = folder / task / f"seed_{seed}.npz"
            try:
                with np.load(path, allow_pickle=False) as z:
                    stats[int(seed)] = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read promotion evidence ({e})") from e
        out[task] = TaskEvidence(task, t["head"], t["headline"], tuple(t["ids"]), stats)
    return out


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class ArpDifference:
    """``ARP(candidate) - ARP(champion)`` with its paired bootstrap percentile interval."""

    diff: float
    lo: float
    hi: float
    ci: float
    n_bootstrap: int
    tasks: tuple[str, ...]
    seeds: dict[str, tuple[int, ...]]


def _aligned(cand: TaskEvidence, champ: TaskEvidence) -> tuple[dict[int, dict[str, np.ndarray]], str | None]:
    """The champion's stats reordered to the candidate's sample order, or a reason why they do not pair."""
    if (cand.head, cand.headline) != (champ.head, champ.headline):
        return {}, (f"task {cand.task}: the champion was scored as {champ.head}/{champ.headline}, "
                    f"the candidate as {cand.head}/{cand.headline}")
    if set(cand.ids) != set(champ.ids) or len(cand.ids) != len(champ.ids):
        return {}, (f"task {cand.task}: the champion was tested on other samples ({len(champ.ids)} vs "
                    f"{len(cand.ids)}, {len(set(cand.ids) ^ set(champ.ids))} differ)")
    pos = {sid: i for i, sid in enumerate(champ.ids)}
    perm = np.array([pos[sid] for sid in cand.ids])
    return {s: {k: v[perm] for k, v in st.items()} for s, st in champ.stats.items()}, None


def arp_difference(
    candidate: Mapping[str, TaskEvidence],
    champion: Mapping[str, TaskEvidence],
    baseline_scores: Mapping[str, float],
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[ArpDifference | None, list[str]]:
    """Paired bootstrap of ``ARP(candidate) - ARP(champion)`` over every task of ``candidate``.

    Seeds pair by value (seed ``s`` of one with seed ``s`` of the other) and samples by id. Returns
    ``(None, reasons)`` when the two cannot be paired on every task.
    """
    from gfm_core.evaluation.bootstrap import bootstrap_draws, bootstrap_values

    reasons: list[str] = []
    per_task = []
    for i, (task, cand) in enumerate(sorted(candidate.items())):
        champ = champion.get(task)
        if champ is None:
            reasons.append(f"task {task}: the champion has no result for it")
            continue
        champ_stats, why = _aligned(cand, champ)
        if why:
            reasons.append(why)
            continue
        seeds = sorted(set(cand.stats) & set(champ_stats))
        if not seeds:
            reasons.append(f"task {task}: no seed in common (candidate {sorted(cand.stats)}, "
                           f"champion {sorted(champ_stats)})")
            continue
        base = baseline_scores.get(task, math.nan)
        if not math.isfinite(base) or base == 0:
            reasons.append(f"task {task}: baseline score {base} cannot scale relative performance")
            continue
        draws = bootstrap_draws(len(cand.ids), len(seeds), n_bootstrap, seed + i)
        a = bootstrap_values(cand.head, cand.headline, [cand.stats[s] for s in seeds], draws)
        b = bootstrap_values(cand.head, cand.headline, [champ_stats[s] for s in seeds], draws)
        champ_ev = TaskEvidence(task, cand.head, cand.headline, cand.ids, champ_stats)
        point = cand.score(seeds) - champ_ev.score(seeds)
        per_task.append((task, tuple(seeds), 100.0 * point / abs(base), 100.0 * (a - b) / abs(base)))
    if reasons or not per_task:
        return None, reasons or ["the candidate has no evaluated task"]
    diff = float(np.mean([p[2] for p in per_task]))
    reps = np.mean(np.stack([p[3] for p in per_task]), axis=0)
    alpha = (1 - ci) / 2
    lo, hi = (float(x) for x in np.quantile(reps, [alpha, 1 - alpha]))
    return ArpDifference(diff, lo, hi, ci, n_bootstrap, tuple(p[0] for p in per_task),
                         {p[0]: p[1] for p in per_task}), []


# ------------------------------------------------------------------------------------------------ the gate


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


def _current(client: Any, name: str, alias: str) -> Any | None:
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

    Besides the ARP rules (module docstring) the registered weights must be the evaluated ones: the version's
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

    current = _current(client, name, cfg.alias)
    method, champ_version, champ_arp, diff = "first", None, None, None
    if current is not None and str(current.version) != str(version):
        champ_version = str(current.version)
        run_id = current.tags.get("gfm.evidence_run_id")
        if run_id:
            method = "bootstrap"
            with tempfile.TemporaryDirectory(prefix="gfm-evidence-") as tmp:
                try:
                    local = client.download_artifacts(run_id, EVIDENCE_DIR, tmp)
                except Exception as e:  # run or artifacts gone
                    raise CheckpointError(
                        f"models:/{name}/{champ_version}: its evidence (run {run_id}, artifacts {EVIDENCE_DIR}/) "
                        f"cannot be read ({type(e).__name__}: {e})"
                    ) from e
                champ_ev = load_evidence(local)
            diff, why = arp_difference(evaluation.evidence, champ_ev, evaluation.baseline_scores,
                                       n_bootstrap=n_bootstrap, ci=ci, seed=seed)
            if diff is None:
                reasons += [f"cannot compare with champion v{champ_version}: {w}" for w in why]
            else:
                champ_arp = cand - diff.diff
                if not diff.lo > cfg.min_gain:
                    reasons.append(
                        f"ARP gain over champion v{champ_version} is {diff.diff:+.2f} with {diff.ci:.0%} interval "
                        f"[{diff.lo:+.2f}, {diff.hi:+.2f}]; its lower bound must exceed {cfg.min_gain:+.2f}"
                    )
        else:
            method = "point"
            raw = current.tags.get("gfm.arp")
            champ_arp = float(raw) if raw is not None else None
            if champ_arp is None or not math.isfinite(champ_arp):
                reasons.append(f"champion v{champ_version} has neither evidence nor an ARP tag to compare with")
            elif not cand > champ_arp + cfg.min_gain:
                reasons.append(
                    f"ARP {cand:+.2f} does not beat champion v{champ_version}'s {champ_arp:+.2f} by "
                    f"{cfg.min_gain} (point estimates: the champion has no stored evidence)"
                )
    elif current is not None:  # the candidate already is the champion: nothing to decide
        return PromotionDecision(str(version), False, [f"v{version} already holds @{cfg.alias}; nothing changed"],
                                 cand, str(current.version), None, {}, "already-champion")
    return PromotionDecision(
        str(version), not reasons, reasons, cand, champ_version, champ_arp,
        {m: v for m, v in others.items() if math.isfinite(v)}, method, diff,
    )


@dataclass(frozen=True)
class PromotionTicket:
    """This process's turn to promote into ``models:/<name>``: version ``number`` of the ledger model.

    ``started``: ``time.monotonic()`` when the turn began (see :func:`promotion_turn` for the lease argument).
    """

    ledger: str
    number: str
    started: float
    lease_s: float

    def check(self, client: Any) -> None:
        """Raise unless the turn is still this process's: lease not (nearly) over, not expired by a waiter.

        Raises:
            RegistryConflictError: the lease ran out (another promotion may have taken over).
        """
        margin = min(60.0, self.lease_s / 10)
        held = time.monotonic() - self.started
        state = client.get_model_version(self.ledger, self.number).tags.get(TICKET_TAG)
        if held > self.lease_s - margin or state != "open":
            raise RegistryConflictError(
                f"models:/{self.ledger}/{self.number}: this promotion held its turn for {held:.0f} s (lease "
                f"{self.lease_s:.0f} s, ticket {state}); another promotion may have taken over, so nothing was "
                f"aliased; run the promotion again"
            )


@contextlib.contextmanager
def promotion_turn(
    client: Any, name: str, source: Any, *, lease_s: float = LEASE_S, poll_s: float = 0.05
) -> Iterator[PromotionTicket]:
    """Serialise the promotions of ``name``: one at a time, in the order they asked, on any MLflow store.

    MLflow has no compare-and-set, but it numbers the versions of a registered model atomically (a unique
    ``(name, version)`` key, retried on conflict, in the sqlite/SQL stores and behind a tracking server alike).
    So each promotion takes a *ticket*, a new version of the ledger model ``<name>.promotions`` tagged
    ``gfm.ticket=open``, and waits until every lower ticket is ``done`` (a ticket lock). A lock file would only
    serialise processes sharing one file system, not clients of a server; a tag written then read back is
    not a compare-and-set (two writers can each read back their own value before the other writes).

    A ticket whose holder died stays ``open``: a waiter that has seen it as the earliest open ticket for
    ``lease_s`` seconds by its own clock marks it ``expired`` and goes on. The holder's lease starts when it
    sees no earlier open ticket, at most a poll before any waiter can see it as the earliest (no clocks are
    compared across machines); it checks the lease, with a margin, before it moves the alias
    (:meth:`PromotionTicket.check`). The ledger doubles as an audit log (who promoted what, with which outcome).

    Args:
        source: the candidate's model version (its ``source``/``run_id`` become the ticket's, which a tracking
            server accepts as a model version source).
        lease_s: how long a turn may last; a crashed holder blocks the others this long at most.
        poll_s: base interval between looks at the earlier tickets (jittered).
    """
    import os
    import random
    import socket

    from mlflow.exceptions import MlflowException

    ledger = f"{name}{LEDGER_SUFFIX}"
    try:
        client.create_registered_model(ledger, description=f"Promotion tickets of {name} (gfm_core.registry)")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    owner = f"{socket.gethostname()}:{os.getpid()}"
    mv = client.create_model_version(
        ledger, source=source.source, run_id=source.run_id or None,
        tags={TICKET_TAG: "open", "gfm.ticket_owner": owner, "gfm.ticket_for": f"{name}/{source.version}"},
    )
    number, outcome = str(mv.version), "error"
    try:
        lowest: tuple[int, float] | None = None  # the earliest open ticket, since when this process has seen it
        while True:
            looked = time.monotonic()
            earlier = sorted(int(v.version) for v in client.search_model_versions(
                f"name = '{ledger}' AND tags.`{TICKET_TAG}` = 'open'") if int(v.version) < int(number))
            if not earlier:
                break
            if lowest is None or lowest[0] != earlier[0]:
                lowest = (earlier[0], looked)
            elif looked - lowest[1] > lease_s:
                client.set_model_version_tag(ledger, str(lowest[0]), TICKET_TAG, "expired")
                client.set_model_version_tag(ledger, str(lowest[0]), "gfm.ticket_expired_by", owner)
                log.warning("models:/%s/%d held the turn for over %.0f s: its holder is gone, marked expired",
                            ledger, lowest[0], lease_s)
            time.sleep(poll_s * (1 + random.random()))
        yield PromotionTicket(ledger, number, looked, lease_s)
        outcome = "done"
    finally:
        client.set_model_version_tag(ledger, number, "gfm.ticket_outcome", outcome)
        client.set_model_version_tag(ledger, number, TICKET_TAG, "done")


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
        now = _current(client, name, cfg.alias)
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


# ------------------------------------------------------------------------------------------------ teachers


@dataclass(frozen=True)
class TeacherFile:
    """A checkpoint in the teacher registry folder.

    ``arch`` comes from a sidecar ``<file stem>.json`` (``{"arch": ...}``), else from the file name when it
    starts with a timm model name (``<arch>[.<tag>].safetensors``, timm's own naming), else None (keep
    ``pretrain.teacher.arch``).
    """

    path: Path
    sha256: str
    arch: str | None


def teacher_stats(folder: str | Path, patterns: Sequence[str]) -> dict[str, list[int]]:
    """``{path: [size, mtime_ns]}`` of the checkpoints in ``folder`` matching ``patterns`` (no folder: none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()}):
        with contextlib.suppress(FileNotFoundError):  # removed between the listing and the stat
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


def scan_teachers(
    folder: str | Path, patterns: Sequence[str], stable: Mapping[str, Sequence[int]] | None = None
) -> dict[str, TeacherFile]:
    """``{sha256: TeacherFile}`` of the checkpoints in ``folder`` matching ``patterns`` (no folder: none).

    With ``stable`` (:func:`teacher_stats` of an earlier look), only files whose size and mtime are still the
    same are hashed and reported: a file still being copied waits until it has stopped changing.
    """
    from gfm_core.io import sha256_file

    out = {}
    for path, st in teacher_stats(folder, patterns).items():
        if stable is not None and list(stable.get(path, ())) != st:
            continue
        p = Path(path)
        try:
            sha = sha256_file(p)
            if stable is not None and [p.stat().st_size, p.stat().st_mtime_ns] != st:
                continue  # it changed while being hashed
        except FileNotFoundError:
            continue
        out.setdefault(sha, TeacherFile(p, sha, _teacher_arch(p)))
    return out


def _teacher_arch(path: Path) -> str | None:
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            arch = json.loads(side.read_text()).get("arch")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{side}: teacher sidecar is not a JSON object with an 'arch' ({e})") from e
        return str(arch) if arch else None
    import timm

    name = path.name.split(".")[0]
    return name if timm.is_model(name) else None


def timm_teachers(patterns: Sequence[str]) -> tuple[str, list[str]]:
    """``(timm version, sorted pretrained names matching patterns)``: the ImageNet weights timm knows about."""
    import timm

    names: set[str] = set()
    for pat in patterns:
        names.update(timm.list_pretrained(pat))
    return timm.__version__, sorted(names)


__all__ = [
    "ArpDifference",
    "Evaluation",
    "PromotionDecision",
    "PromotionTicket",
    "RegistryConflictError",
    "TaskEvidence",
    "TeacherFile",
    "arp_difference",
    "decide",
    "load_evidence",
    "promote",
    "promotion_turn",
    "save_evidence",
    "scan_teachers",
    "teacher_stats",
    "timm_teachers",
]
