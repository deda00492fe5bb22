"""The evaluation report: a table like the paper's (rows = models, columns = tasks), ARP, bootstrap CIs.

- **Table**: each cell is the mean over seeds of a task metric (``± std`` in markdown when there are several
  seeds); the best value of a column is bold.
- **ARP** (average relative performance, paper Table 1 / Eq. 1, whose exact form was not retrieved): the mean
  over tasks of ``100 * (s_model - s_baseline) / s_baseline`` on each task's headline metric (all of them are
  higher-is-better), with the ImageNet model as the baseline (ARP 0 by definition).
- **Paired bootstrap** (:mod:`gfm_core.evaluation.bootstrap`): for each task and model, the difference of the
  headline metric to the reference (GFM). Each replicate draws test samples with replacement *and* seeds with
  replacement; both models are scored on the same draw (paired), the metric is recomputed from per-sample
  statistics, and the CI is the percentile interval.
- **Pretraining seeds**: ``evaluate.pretraining_seeds`` pools several fine-tuned models, one per pretraining run
  (seed), into one row; its cells average the runs, and its bootstrap resamples the pretraining runs too
  (hierarchically: runs, then fine-tuning seeds, then samples). Other rows are one pretraining each.
- **Outputs** (atomic): ``report.csv`` (the table + ARP), ``bootstrap.csv``, ``report.md``, ``report.json``
  and ``radar.png`` (headline metric relative to the baseline, in %, per task).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.config import Params
from gfm_core.errors import CheckpointError, ConfigError, DataValidationError
from gfm_core.evaluation.bootstrap import bootstrap_draws, bootstrap_values, group_mean, paired_bootstrap
from gfm_core.evaluation.trivial import TRIVIAL
from gfm_core.io import write_bytes, write_json, write_text

log = logging.getLogger(__name__)

#: Columns shown per head (the headline metric comes first when a task overrides it).
COLUMN_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("acc",),
    "multilabel": ("mAP",),
    "segmentation": ("mIoU",),
    "change": ("precision", "recall", "F1"),
    "superres": ("PSNR", "SSIM"),
}


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
    """The evaluation report (see the module docstring); ``paths`` is filled by :func:`write_report`."""

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

    def task_mdd(self, task: str) -> float:
        """The median minimal detectable difference of the task's comparisons to the reference (NaN: none)."""
        vals = [d[task].mdd for d in self.ci.values() if task in d]
        return float(np.median(vals)) if vals else math.nan

    def cell(self, model: str, task: str, metric: str | None = None) -> float:
        return self.mean[model][f"{task}/{metric or self.headlines[task]}"]

    def to_json(self) -> dict[str, Any]:
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
        }


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


# ------------------------------------------------------------------------------------------------ building


def build_report(
    runs: Sequence[RunScores],
    *,
    models: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    baseline: str = "imagenet",
    reference: str = "gfm",
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    missing: Sequence[str] = (),
    arp_exclude: Mapping[str, str] | None = None,
    pretraining_seeds: Mapping[str, Sequence[str]] | None = None,
) -> Report:
    """Aggregate runs into the report (no files written; see :func:`write_report`).

    ``pretraining_seeds`` maps a row name to the models it pools, one per pretraining run (module docstring).

    Raises:
        ConfigError: no runs, the baseline/reference is not among the models, or two pooled rows hold different
            numbers of pretraining runs (they pair by position).
        DataValidationError: runs of one task were tested on different samples (paired stats impossible), or
            runs of one model started from different backbone bytes.
    """
    if not runs:
        raise ConfigError("no fine-tuning results to report (run gfm finetune first)")
    pooled = {row: list(members) for row, members in (pretraining_seeds or {}).items()}
    row_of = {m: (row, j) for row, members in pooled.items() for j, m in enumerate(members)}
    runs = [replace(r, model=row_of[r.model][0], pretrain=row_of[r.model][1]) if r.model in row_of else r
            for r in runs]
    models = list(models) if models else list(dict.fromkeys(r.model for r in runs))
    models = list(dict.fromkeys(row_of.get(m, (m, 0))[0] for m in models))
    tasks = list(tasks) if tasks else list(dict.fromkeys(r.task for r in runs))
    for role, name in (("baseline", baseline), ("reference", reference)):
        if name not in models:
            raise ConfigError(f"evaluate.{role} {name!r} is not among the reported models {models}")
    by_key: dict[tuple[str, str], dict[tuple[int, int], RunScores]] = {}  # (model, task) -> (pretrain, seed)
    heads: dict[str, str] = {}
    headlines: dict[str, str] = {}
    for r in runs:
        if r.task not in tasks or r.model not in models:
            continue
        by_key.setdefault((r.model, r.task), {})[(r.pretrain, r.seed)] = r
        if (
            heads.setdefault(r.task, r.head) != r.head
            or headlines.setdefault(r.task, r.headline) != r.headline
        ):
            raise DataValidationError(f"task {r.task}: results disagree on its head/headline metric")
    tasks = [t for t in tasks if t in heads]
    _check_same_samples(by_key, tasks)
    backbones = _check_same_backbone(by_key, pooled)

    columns = []
    for t in tasks:
        names = list(dict.fromkeys((headlines[t], *COLUMN_METRICS[heads[t]])))
        columns += [(t, m) for m in names]
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    seeds: dict[str, dict[str, list[int]]] = {}
    for m in models:
        mean[m], std[m], seeds[m] = {}, {}, {}
        for t, metric in columns:
            got = by_key.get((m, t), {})
            units = sorted(got)
            vals = [got[u].metrics.get(metric, math.nan) for u in units]
            mean[m][f"{t}/{metric}"] = group_mean(vals, [j for j, _ in units])  # over runs of their mean over seeds
            std[m][f"{t}/{metric}"] = (
                float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else math.nan)
            )
        for t in tasks:
            seeds[m][t] = sorted({s for _, s in by_key.get((m, t), {})})
    excluded = dict(arp_exclude or {})
    head_scores = {m: {t: mean[m][f"{t}/{headlines[t]}"] for t in tasks if t not in excluded} for m in models}
    arp = {m: average_relative_performance(head_scores[m], head_scores[baseline]) for m in models}

    cis: dict[str, dict[str, BootstrapCI]] = {m: {} for m in models if m != reference}
    for t in tasks:
        ref_runs = by_key.get((reference, t), {})
        for m in cis:
            got = by_key.get((m, t), {})
            pairs = _pair_units(got, ref_runs, m, reference)
            if not pairs:
                continue
            diff, lo, hi = paired_bootstrap(
                heads[t],
                headlines[t],
                [got[a].stats for a, _, _ in pairs],
                [ref_runs[b].stats for _, b, _ in pairs],
                n_bootstrap=n_bootstrap,
                ci=ci,
                seed=seed,
                groups=[g for _, _, g in pairs],
            )
            cis[m][t] = BootstrapCI(
                t, headlines[t], m, reference, diff, lo, hi, len(got[pairs[0][0]].ids), len(pairs), n_bootstrap, ci,
                len({g for _, _, g in pairs}),
            )
    return Report(
        models,
        tasks,
        heads,
        headlines,
        columns,
        mean,
        std,
        seeds,
        arp,
        baseline,
        reference,
        cis,
        ci,
        list(missing),
        backbones={**{m: backbones.get(m) for m in models}, **{m: backbones.get(m) for m in row_of}},
        arp_excluded={t: why for t, why in (arp_exclude or {}).items() if t in tasks},
        pretrainings={row: members for row, members in pooled.items() if row in models},
    )


def _pair_units(
    a: Mapping[tuple[int, int], RunScores], b: Mapping[tuple[int, int], RunScores], name_a: str, name_b: str
) -> list[tuple[tuple[int, int], tuple[int, int], int]]:
    """Paired units ``(unit of a, unit of b, pretraining group)``: same fine-tuning seed, and the same pretraining
    run by position where both rows pool several (a row of one pretraining pairs with every run of the other)."""
    pa, pb = sorted({j for j, _ in a}), sorted({j for j, _ in b})
    if not pa or not pb:  # a model without results on this task
        return []
    if len(pa) > 1 and len(pb) > 1 and pa != pb:
        raise ConfigError(f"evaluate.pretraining_seeds: {name_a} pools {len(pa)} pretraining runs and {name_b} "
                          f"{len(pb)}; pooled rows pair by position, so give them as many runs each")
    out = []
    for g in pa if len(pa) > 1 else pb:
        ja, jb = (g if len(pa) > 1 else pa[0]), (g if len(pb) > 1 else pb[0])
        for s in sorted({s for j, s in a if j == ja} & {s for j, s in b if j == jb}):
            out.append(((ja, s), (jb, s), g))
    return out


def _check_same_backbone(
    by_key: Mapping[tuple[str, str], Mapping[tuple[int, int], RunScores]], pooled: Mapping[str, Sequence[str]]
) -> dict[str, str | None]:
    """``model -> sha256`` of the backbone all its runs started from (None when no run recorded one); a pooled
    row's models are checked one by one (under their own names; the row itself maps to None).

    Raises:
        DataValidationError: one model's runs started from different bytes (or some recorded none).
    """
    groups: dict[str, dict[str | None, list[RunScores]]] = {}
    for (row, _), runs in by_key.items():
        for r in runs.values():
            model = pooled[row][r.pretrain] if row in pooled else row
            groups.setdefault(model, {}).setdefault(r.backbone_sha256, []).append(r)
    out: dict[str, str | None] = {}
    for model, by_sha in groups.items():
        if len(by_sha) > 1:
            lines = []
            for sha, runs in by_sha.items():
                name = f"sha256 {sha}" if sha else "unrecorded backbone (written before backbone hashes)"
                files = ", ".join(str(r.source or f"{r.task}/{r.model}/seed_{r.seed}") for r in runs)
                lines.append(f"  {name}: {files}")
            raise DataValidationError(
                f"model {model}: its fine-tuning results started from different backbone bytes, so they "
                f"cannot be reported together:\n" + "\n".join(lines) +
                f"\nThe backbone changed between fine-tuning runs; re-run `gfm finetune --model {model}` (every "
                f"task and seed), then `gfm evaluate`"
            )
        out[model] = next(iter(by_sha))
    return out


def _check_same_samples(
    by_key: Mapping[tuple[str, str], Mapping[tuple[int, int], RunScores]], tasks: Sequence[str]
) -> None:
    for t in tasks:
        first: RunScores | None = None
        for (_, task), runs in by_key.items():
            if task != t:
                continue
            for r in runs.values():
                if first is None:
                    first = r
                elif r.ids != first.ids:
                    raise DataValidationError(
                        f"task {t}: {r.model} seed {r.seed} was tested on other samples than "
                        f"{first.model} seed "
                        f"{first.seed} ({len(r.ids)} vs {len(first.ids)}); rerun them on the same test split"
                    )


# ------------------------------------------------------------------------------------------------ writing


def _fmt(v: float, metric: str) -> str:
    if math.isnan(v):
        return "—"
    return f"{v:.3f}" if metric in ("SSIM",) else f"{v:.2f}"


def to_markdown(report: Report) -> str:
    """The table (bold = best of a column), ARP, and the bootstrap differences to the reference."""
    r = report
    header = ["model", *[f"{t} {m}" for t, m in r.columns], f"ARP vs {r.baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    best = {}
    for t, m in r.columns:
        vals = [r.mean[x][f"{t}/{m}"] for x in r.models if not math.isnan(r.mean[x][f"{t}/{m}"])]
        best[f"{t}/{m}"] = max(vals) if vals else math.nan
    for model in r.models:
        row = [model + (f" ({len(r.pretrainings[model])} pretrainings)" if model in r.pretrainings else "")]
        for t, m in r.columns:
            key = f"{t}/{m}"
            v = r.mean[model][key]
            s = _fmt(v, m)
            if len(r.seeds[model].get(t, [])) > 1 and not math.isnan(v):
                s += f" ± {_fmt(r.std[model][key], m)}"
            row.append(f"**{s}**" if v == best[key] and not math.isnan(v) else s)
        row.append("—" if math.isnan(r.arp[model]) else f"{r.arp[model]:+.2f}")
        lines.append("| " + " | ".join(row) + " |")
    pct = round(100 * r.ci_level)
    out = [
        "# Downstream evaluation",
        "",
        f"Cells: mean over seeds (± std when several). "
        f"ARP: mean over tasks of 100 x (headline - {r.baseline}) / "
        f"{r.baseline} (paper Table 1).",
        "",
        *lines,
        "",
        f"## Paired bootstrap: headline difference to {r.reference} ({pct}% CI over test samples and seeds)",
        "",
        "| model | " + " | ".join(f"{t} Δ{r.headlines[t]}" for t in r.tasks) + " |",
        "|---|" + "---:|" * len(r.tasks),
    ]
    for model in r.models:
        if model == r.reference:
            continue
        cells = []
        for t in r.tasks:
            c = r.ci.get(model, {}).get(t)
            cells.append(
                "—"
                if c is None
                else f"{c.diff:+.2f} [{c.lo:+.2f}, {c.hi:+.2f}]" + ("*" if c.excludes_zero else "")
            )
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    out.append("| resolvable difference (MDD, 80 % power) | " + " | ".join(
        "—" if math.isnan(r.task_mdd(t)) else f"{r.task_mdd(t):.2f}" for t in r.tasks) + " |")
    pooled = ", ".join(f"{m} ({len(v)})" for m, v in r.pretrainings.items())
    out += ["", "\\* the interval excludes 0. Intervals resample test samples and fine-tuning seeds (paired)" + (
        f", and the pretraining runs of the pooled rows {pooled}; every other row is one pretraining run, whose "
        "variance is not in its intervals." if pooled else "; each pretrained backbone is one pretraining run, so "
        "pretraining-seed variance is not in them (pool several with `evaluate.pretraining_seeds`; the science "
        "report resamples pretraining seeds).")]
    for t in r.tasks:  # separating GFM from the trivial row alone does not rank the models
        if not any(d[t].excludes_zero for m, d in r.ci.items() if t in d and m != TRIVIAL):
            out.append(f"- **{t}** does not rank the models: no difference to {r.reference} is resolved at this test "
                       f"size (MDD about {r.task_mdd(t):.2f} {r.headlines[t]}).")
    if r.arp_excluded:
        out += ["", "Tasks outside ARP: " + "; ".join(f"**{t}** ({why})" for t, why in r.arp_excluded.items())]
    if r.missing:
        out += ["", "## Missing results", "", *[f"- {m}" for m in r.missing]]
    return "\n".join(out) + "\n"


def to_csv(report: Report) -> str:
    """One row per model: every table column (``task/metric``) and ARP."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [f"{t}/{m}" for t, m in report.columns]
    w.writerow(["model", *keys, "ARP"])
    for model in report.models:
        w.writerow([model, *[_csv_num(report.mean[model][k]) for k in keys], _csv_num(report.arp[model])])
    return buf.getvalue()


def bootstrap_csv(report: Report) -> str:
    """One row per (model, task): the difference to the reference and its interval."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["model", "reference", "task", "metric", "diff", "lo", "hi", "n_samples", "n_seeds", "n_bootstrap"]
    )
    for model, d in report.ci.items():
        for t, c in d.items():
            w.writerow(
                [
                    model,
                    c.reference,
                    t,
                    c.metric,
                    _csv_num(c.diff),
                    _csv_num(c.lo),
                    _csv_num(c.hi),
                    c.n_samples,
                    c.n_seeds,
                    c.n_bootstrap,
                ]
            )
    return buf.getvalue()


def _csv_num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6g}"


def radar_png(report: Report) -> bytes:
    """Radar chart: each task's headline metric relative to the baseline (100 = baseline)."""
    from gfm_core.evaluation.figures import new_figure, png_bytes

    tasks = report.tasks
    angles = np.linspace(0, 2 * np.pi, max(len(tasks), 1), endpoint=False).tolist()
    fig = new_figure(6, 6, dpi=100)
    ax = fig.add_subplot(projection="polar")
    for model in report.models:
        vals = []
        for t in tasks:
            b, s = report.cell(report.baseline, t), report.cell(model, t)
            vals.append(100 * s / b if b and not math.isnan(b) and not math.isnan(s) else np.nan)
        if all(math.isnan(v) for v in vals):
            continue  # no result for this model (listed under "missing" in the report)
        ax.plot([*angles, angles[0]], [*vals, vals[0]], marker="o", label=model)
    ax.set_xticks(angles)
    ax.set_xticklabels([f"{t}\n{report.headlines[t]}" for t in tasks])
    ax.set_title(f"headline metric, % of {report.baseline}")
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize="small")
    return png_bytes(fig, bbox_inches="tight")


def write_report(report: Report, out_dir: str | Path) -> Report:
    """Write report.csv, bootstrap.csv, report.md, report.json and radar.png atomically; return with paths."""
    out = Path(out_dir)
    paths = {
        "csv": out / "report.csv",
        "bootstrap_csv": out / "bootstrap.csv",
        "markdown": out / "report.md",
        "json": out / "report.json",
        "radar": out / "radar.png",
    }
    write_text(paths["csv"], to_csv(report))
    write_text(paths["bootstrap_csv"], bootstrap_csv(report))
    write_text(paths["markdown"], to_markdown(report))
    write_bytes(paths["radar"], radar_png(report))
    final = Report(**{**report.__dict__, "paths": paths})
    write_json(paths["json"], final.to_json())
    return final


# ------------------------------------------------------------------------------------------------ stage API


def load_run(result_json: str | Path) -> RunScores:
    """A run's metrics (``result.json``) and per-sample statistics (``scores.parquet``)."""
    from gfm_core.evaluation.results import load_result, load_scores

    res = load_result(result_json)
    ids, stats = load_scores(
        res.scores if res.scores.is_absolute() else Path(result_json).parent / res.scores.name
    )
    return RunScores(res.task, res.head, res.model, res.seed, res.headline, dict(res.metrics), ids, stats,
                     res.backbone_sha256, Path(result_json))


def evaluate_results(results: Sequence[Any], *, out_dir: str | Path | None = None, **kwargs: Any) -> Report:
    """Report over :class:`~gfm_core.evaluation.results.FinetuneResult` objects (their ``result.json``/``scores``).

    ``kwargs`` go to :func:`build_report` (models, tasks, baseline, reference, n_bootstrap, ci, seed); with
    ``out_dir`` the files are written too.
    """
    report = build_report([load_run(r.result_json) for r in results], **kwargs)
    return write_report(report, out_dir) if out_dir is not None else report


def run_evaluation(params: Params) -> Report:
    """Stage entry point: read every (model, task, seed) result under ``finetune.out_dir``; write the report.

    Raises:
        CheckpointError: a result is missing and ``evaluate.require_complete`` is true (all are listed).
    """
    from gfm_core.evaluation.results import RESULT_FILE, result_dir

    ev, ft = params.evaluate, params.finetune
    models = list(ev.models) or [m.name for m in ft.models]
    tasks = list(ev.tasks) or [t.name for t in ft.tasks]
    known_models, known_tasks = {m.name for m in ft.models}, {t.name for t in ft.tasks}
    for kind, names, known in (("models", models, known_models), ("tasks", tasks, known_tasks)):
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"evaluate.{kind}: {bad} not in finetune.{kind} ({sorted(known)})")
    runs, missing = [], []
    for t in tasks:
        for m in models:
            for s in ft.seeds:
                path = result_dir(ft, t, m, s) / RESULT_FILE
                if path.is_file():
                    runs.append(load_run(path))
                else:
                    missing.append(f"{path} (task {t}, model {m}, seed {s})")
    if missing:
        msg = f"{len(missing)} fine-tuning result(s) missing; run gfm finetune for them:\n  " + "\n  ".join(
            missing
        )
        if ev.require_complete:
            raise CheckpointError(msg + "\n(or set evaluate.require_complete: false to report what exists)")
        log.warning(msg)
    unknown = sorted(set(ev.arp_exclude) - known_tasks)
    if unknown:
        raise ConfigError(f"evaluate.arp_exclude: {unknown} not in finetune.tasks ({sorted(known_tasks)})")
    if ev.trivial:  # the trivial predictor of each task (fitted on its train split) as one more row
        from gfm_core.evaluation.trivial import TRIVIAL, trivial_scores

        for t in tasks:
            runs.extend(trivial_scores(params.task(t), ft.seeds))
        models = [*models, TRIVIAL]
    report = build_report(
        runs,
        models=models,
        tasks=tasks,
        baseline=ev.baseline,
        reference=ev.reference,
        n_bootstrap=ev.n_bootstrap,
        ci=ev.ci,
        seed=ev.seed,
        missing=missing,
        arp_exclude=ev.arp_exclude,
        pretraining_seeds=ev.pretraining_seeds,
    )
    report = write_report(report, ev.out_dir)
    log.info("evaluation report: %s", report.paths["markdown"])
    return report


__all__ = [
    "BootstrapCI",
    "Report",
    "RunScores",
    "average_relative_performance",
    "bootstrap_draws",
    "bootstrap_values",
    "build_report",
    "evaluate_results",
    "load_run",
    "paired_bootstrap",
    "run_evaluation",
    "to_csv",
    "to_markdown",
    "write_report",
]
