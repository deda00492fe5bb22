"""The candidate against the champion: a paired bootstrap of the candidate's ARP *with the champion as the
baseline* on the same test samples and seeds.

The reference is the champion's own headline score per task, not the current evaluation's ImageNet baseline: when
the teacher changes (a retraining on a newly released teacher), the ImageNet baseline of the new evaluation moves
with it, and a gain measured against it could come from the moved baseline alone. Raw headline metrics of the two
backbones on the same samples, scaled by the champion's score, cannot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gfm_core.registry.evidence import TaskEvidence


@dataclass(frozen=True)
class ArpDifference:
    """The candidate's relative performance over the champion, ``mean_t 100 * (s_cand_t - s_champ_t) / |s_champ_t|``
    (ARP with the champion as the baseline), with its paired bootstrap percentile interval."""

    diff: float
    lo: float
    hi: float
    ci: float
    n_bootstrap: int
    tasks: tuple[str, ...]
    seeds: dict[str, tuple[int, ...]]
    per_task: dict[str, TaskDifference] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDifference:
    """One task's raw headline scores (candidate, reference) and their difference's paired percentile interval."""

    headline: str
    candidate: float
    reference: float
    lo: float
    hi: float

    @property
    def diff(self) -> float:
        """Candidate minus reference, in the metric's own units."""
        return self.candidate - self.reference


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
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[ArpDifference | None, list[str]]:
    """Paired bootstrap of the candidate's ARP against the champion (:class:`ArpDifference`) over every task of
    ``candidate``; each replicate's tasks are scaled by the champion's point score (the fixed reference).

    Seeds pair by value (seed ``s`` of one with seed ``s`` of the other) and samples by id. Returns
    ``(None, reasons)`` when the two cannot be paired on every task.
    """
    from gfm_core.evaluation.bootstrap import bootstrap_draws, bootstrap_values

    reasons: list[str] = []
    per_task = []
    raw: dict[str, TaskDifference] = {}
    alpha = (1 - ci) / 2
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
        champ_ev = TaskEvidence(task, cand.head, cand.headline, cand.ids, champ_stats)
        base = champ_ev.score(seeds)
        if not math.isfinite(base) or base == 0:
            reasons.append(f"task {task}: the champion's score {base} cannot scale relative performance")
            continue
        draws = bootstrap_draws(len(cand.ids), len(seeds), n_bootstrap, seed + i)
        a = bootstrap_values(cand.head, cand.headline, [cand.stats[s] for s in seeds], draws)
        b = bootstrap_values(cand.head, cand.headline, [champ_stats[s] for s in seeds], draws)
        point = cand.score(seeds) - base
        per_task.append((task, tuple(seeds), 100.0 * point / abs(base), 100.0 * (a - b) / abs(base)))
        t_lo, t_hi = (float(x) for x in np.quantile(a - b, [alpha, 1 - alpha]))
        raw[task] = TaskDifference(cand.headline, cand.score(seeds), base, t_lo, t_hi)
    if reasons or not per_task:
        return None, reasons or ["the candidate has no evaluated task"]
    diff = float(np.mean([p[2] for p in per_task]))
    reps = np.mean(np.stack([p[3] for p in per_task]), axis=0)
    lo, hi = (float(x) for x in np.quantile(reps, [alpha, 1 - alpha]))
    return ArpDifference(diff, lo, hi, ci, n_bootstrap, tuple(p[0] for p in per_task),
                         {p[0]: p[1] for p in per_task}, raw), []
