"""What the evaluation report holds: per-run scores, bootstrap intervals, the report itself, and ARP.

The report's contents are described in :mod:`gfm_core.evaluation.report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.evaluation.geobench import MIN_SEEDS, IQMRow, LeaderboardRow


@dataclass(frozen=True)
class RunScores:
    """What the report needs of one (task, model, seed) run: metrics and per-sample statistics."""

    task: str
    head: str
    model: str
    seed: int
    headline: str
    metrics: dict[str, float]
    ids: list[str]
    stats: dict[str, np.ndarray]
    backbone_sha256: str | None = None  # the backbone bytes fine-tuning started from (None: not recorded)
    source: Path | None = None  # the result file
    pretrain: int = 0  # which pretraining run of its (pooled) row the backbone came from
    protocol: str | None = None  # finetune.protocol of the run (None: not a fine-tuning run, e.g. the trivial row)
    scoring: str | None = None  # finetune.scoring of the run (None: as for protocol)
    label_fraction: float = 1.0  # share of the train split it trained on


@dataclass(frozen=True)
class BootstrapCI:
    """``diff`` = model - reference on a task's headline metric, with its percentile interval."""

    task: str
    metric: str
    model: str
    reference: str
    diff: float
    lo: float
    hi: float
    n_samples: int
    n_seeds: int
    n_bootstrap: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0."""
        return self.lo > 0 or self.hi < 0

    ci: float = 0.95
    n_pretrainings: int = 1  # pretraining runs resampled (1: the models are one pretraining each)

    @property
    def mdd(self) -> float:
        """Minimal detectable difference: 2.8 standard errors (80 % power, two-sided 5 %), SE from the interval."""
        from scipy.stats import norm

        return 2.8 * (self.hi - self.lo) / (2 * float(norm.ppf(0.5 + self.ci / 2)))


@dataclass(frozen=True)
class Report:
    """The evaluation report (see :mod:`gfm_core.evaluation.report`).

    ``paths`` is filled by :func:`~gfm_core.evaluation.report_render.write_report`.
    """

    models: list[str]
    tasks: list[str]
    heads: dict[str, str]
    headlines: dict[str, str]
    columns: list[tuple[str, str]]  # (task, metric)
    mean: dict[str, dict[str, float]]  # model -> "task/metric" -> mean over seeds (NaN if missing)
    std: dict[str, dict[str, float]]
    seeds: dict[str, dict[str, list[int]]]  # model -> task -> seeds found
    arp: dict[str, float]
    baseline: str
    reference: str
    ci: dict[str, dict[str, BootstrapCI]]  # model -> task -> CI (reference itself omitted)
    ci_level: float
    missing: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    backbones: dict[str, str | None] = field(default_factory=dict)  # model -> sha256 its results started from
    arp_excluded: dict[str, str] = field(default_factory=dict)  # task -> why it is not part of ARP
    pretrainings: dict[str, list[str]] = field(default_factory=dict)  # pooled row -> its fine-tuned models
    protocol: str | None = None  # finetune.protocol of every fine-tuning result (None: not recorded)
    scoring: str | None = None  # finetune.scoring of every fine-tuning result (None: not recorded)
    iqm: list[IQMRow] = field(default_factory=list)  # GEO-Bench-2 aggregation (empty: evaluate.iqm off)
    leaderboard: list[LeaderboardRow] = field(default_factory=list)  # results_and_parameters.csv rows
    norm_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (min, max) normalising
    few_seeds: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> task -> runs, under min_seeds
    min_seeds: int = MIN_SEEDS

    def task_mdd(self, task: str) -> float:
        """The median minimal detectable difference of the task's comparisons to the reference (NaN: none)."""
        vals = [d[task].mdd for d in self.ci.values() if task in d]
        return float(np.median(vals)) if vals else math.nan

    def cell(self, model: str, task: str, metric: str | None = None) -> float:
        """The mean of ``task/metric`` for ``model`` (the task's headline metric by default)."""
        return self.mean[model][f"{task}/{metric or self.headlines[task]}"]

    def tracked_metrics(self) -> dict[str, float]:
        """What the evaluation stage logs (MLflow, Dagster): ``arp.<model>``."""
        return {f"arp.{m}": v for m, v in self.arp.items()}

    def tracked_files(self) -> dict[str, Path]:
        """The files the evaluation stage's tracked run keeps (the written report)."""
        return dict(self.paths)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (NaN becomes None)."""
        return {
            "models": self.models,
            "tasks": self.tasks,
            "heads": self.heads,
            "headlines": self.headlines,
            "columns": [f"{t}/{m}" for t, m in self.columns],
            "mean": _nan_to_none(self.mean),
            "std": _nan_to_none(self.std),
            "seeds": self.seeds,
            "arp": _nan_to_none(self.arp),
            "baseline": self.baseline,
            "reference": self.reference,
            "ci_level": self.ci_level,
            "bootstrap": {m: {t: _ci_json(c) for t, c in d.items()} for m, d in self.ci.items()},
            "missing": self.missing,
            "backbones": self.backbones,
            "arp_excluded": self.arp_excluded,
            "pretrainings": self.pretrainings,
            "mdd": {t: self.task_mdd(t) for t in self.tasks},
            "paths": {k: str(v) for k, v in self.paths.items()},
            "arp_definition": "mean over tasks of 100 * (headline - baseline) / baseline",
            **self._geobench_json(),
        }

    def _geobench_json(self) -> dict[str, Any]:
        """The keys the protocol and the GEO-Bench-2 aggregation add to :meth:`to_json`."""
        out: dict[str, Any] = {"protocol": self.protocol, "scoring": self.scoring}
        if self.iqm:
            out["iqm"] = {r.model: r.to_json() for r in self.iqm}
            out["iqm_definition"] = (
                "25% trimmed mean over all runs of all tasks of min-max normalised headline scores (min, max over "
                "every run of the report per task); interval: percentile, stratified bootstrap of the seeds within "
                "each task (GEO-Bench-2 / rliable)"
            )
            out["normalisation"] = {t: list(r) for t, r in self.norm_ranges.items()}
            out["few_seeds"] = self.few_seeds
            out["min_seeds"] = self.min_seeds
        return out


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return obj


def _ci_json(c: BootstrapCI) -> dict[str, Any]:
    return {
        "metric": c.metric,
        "diff": c.diff,
        "lo": c.lo,
        "hi": c.hi,
        "n_samples": c.n_samples,
        "n_seeds": c.n_seeds,
        "n_pretrainings": c.n_pretrainings,
        "n_bootstrap": c.n_bootstrap,
        "excludes_zero": c.excludes_zero,
    }


# ------------------------------------------------------------------------------------------------ statistics


def average_relative_performance(scores: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """``mean_t 100 * (scores[t] - baseline[t]) / baseline[t]`` over the tasks both have (NaN if none).

    Raises:
        ValueError: a baseline score is 0 (relative performance undefined).
    """
    rel = []
    for task, s in scores.items():
        b = baseline.get(task, math.nan)
        if math.isnan(s) or math.isnan(b):
            continue
        if b == 0:
            raise ValueError(f"task {task}: baseline score is 0, relative performance is undefined")
        rel.append(100.0 * (s - b) / abs(b))
    return float(np.mean(rel)) if rel else math.nan
