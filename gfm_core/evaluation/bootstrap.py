"""Paired bootstrap of fine-tuning results over test samples, fine-tuning seeds and pretraining seeds.

A *unit* is one fine-tuning run; units are grouped by the pretraining run their backbone came from (a single
group when a model is one pretraining). One replicate draws, with replacement and the same draw for both models
of a comparison: the groups, then the units within each drawn group, then the test samples (rows). The
replicate's value is the mean over the drawn units of the metric recomputed on the drawn rows
(:func:`gfm_core.evaluation.metrics.metrics_from_stats`); the point estimate is the mean over groups of the mean
over their units. With one group this is the flat seeds-and-samples bootstrap.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from gfm_core.evaluation.metrics import metrics_from_stats

Draw = tuple[np.ndarray, np.ndarray]
"""(unit indices, sample rows) of one replicate."""


def bootstrap_draws(
    n_samples: int, n_units: int, n: int, seed: int, groups: Sequence[int] | None = None
) -> list[Draw]:
    """``n`` replicates of (unit indices, sample rows): groups, then units within them, then rows.

    ``groups`` is the group (pretraining run) of every unit; ``None`` puts every unit in one group.
    """
    rng = np.random.default_rng(seed)
    g = np.zeros(n_units, np.int64) if groups is None else np.asarray(groups)
    if len(g) != n_units:
        raise ValueError(f"bootstrap_draws: {len(g)} group labels for {n_units} units")
    members = [np.flatnonzero(g == k) for k in np.unique(g)]
    out = []
    for _ in range(n):
        picked = members if len(members) == 1 else [members[k] for k in rng.integers(0, len(members), len(members))]
        units = np.concatenate([m[rng.integers(0, len(m), len(m))] for m in picked])
        out.append((units, rng.integers(0, n_samples, n_samples)))
    return out


def bootstrap_values(
    head: str,
    metric: str,
    per_unit: Sequence[Mapping[str, np.ndarray]],
    draws: Sequence[Draw],
) -> np.ndarray:
    """The metric on every replicate: mean over the drawn units of the metric on the drawn rows."""
    out = np.empty(len(draws))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns on replicates without positives
        for b, (units, rows) in enumerate(draws):
            out[b] = np.mean([metrics_from_stats(head, per_unit[u], rows)[metric] for u in units])
    return out


def group_mean(values: Sequence[float], groups: Sequence[int] | None = None) -> float:
    """Mean over groups of the mean of their units' values (NaN when there are none)."""
    vals = np.asarray(values, np.float64)
    if not len(vals):
        return float("nan")
    g = np.zeros(len(vals), np.int64) if groups is None else np.asarray(groups)
    return float(np.mean([vals[g == k].mean() for k in np.unique(g)]))


def point_estimate(head: str, metric: str, per_unit: Sequence[Mapping[str, np.ndarray]],
                   groups: Sequence[int] | None = None) -> float:
    """Mean over groups of the mean over their units of the metric on every row."""
    return group_mean([metrics_from_stats(head, s)[metric] for s in per_unit], groups)


def paired_bootstrap(
    head: str,
    metric: str,
    model: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> tuple[float, float, float]:
    """``(diff, lo, hi)`` of ``metric(model) - metric(reference)``.

    Unit ``i`` of one pairs with unit ``i`` of the other (same fine-tuning seed, same pretraining seed where
    both have several), both are scored on the same samples, and ``groups`` names each unit's pretraining run.

    Raises:
        ValueError: different numbers of units or samples.
    """
    if len(model) != len(reference) or not model:
        raise ValueError(f"paired bootstrap needs the same seeds: {len(model)} vs {len(reference)} runs")
    n = _rows(model[0])
    if any(_rows(s) != n for s in (*model, *reference)):
        raise ValueError("paired bootstrap needs the same test samples in every run")
    draws = bootstrap_draws(n, len(model), n_bootstrap, seed, groups)
    diffs = bootstrap_values(head, metric, model, draws) - bootstrap_values(head, metric, reference, draws)
    point = point_estimate(head, metric, model, groups) - point_estimate(head, metric, reference, groups)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return point, float(lo), float(hi)


def _rows(stats: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(stats.values())))
