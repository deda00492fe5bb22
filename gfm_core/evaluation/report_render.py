"""Render the evaluation report: Markdown, CSV tables, the radar PNG, and the atomic write of all of them.

The report's contents are described in :mod:`gfm_core.evaluation.report`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from gfm_core.evaluation.geobench import CSV_FILE, write_csv
from gfm_core.evaluation.report_data import Report
from gfm_core.evaluation.trivial import TRIVIAL
from gfm_core.io import write_bytes, write_json, write_text


def _fmt(v: float, metric: str) -> str:
    if math.isnan(v):
        return "—"
    return f"{v:.3f}" if metric in ("SSIM",) else f"{v:.2f}"


def to_markdown(report: Report) -> str:
    """The table (bold = best of a column), ARP, and the bootstrap differences to the reference."""
    r = report
    pct = round(100 * r.ci_level)
    out = [
        "# Downstream evaluation",
        "",
        f"Cells: mean over seeds (± std when several). "
        f"ARP: mean over tasks of 100 x (headline - {r.baseline}) / "
        f"{r.baseline} (paper Table 1).",
        *_protocol_lines(r),
        "",
        *_table_lines(r),
        "",
        f"## Paired bootstrap: headline difference to {r.reference} ({pct}% CI over test samples and seeds)",
        "",
        *_bootstrap_lines(r),
        *_notes(r),
        *_iqm_lines(r),
        *_missing_lines(r),
    ]
    return "\n".join(out) + "\n"


def _protocol_lines(r: Report) -> list[str]:
    """Which protocol produced the fine-tuned numbers (nothing when the runs recorded none)."""
    if r.protocol is None and r.scoring is None:
        return []
    return ["", f"Protocol: {r.protocol or 'not recorded'}, scoring: {r.scoring or 'not recorded'} (every "
                f"fine-tuning result in this report)."]


def _iqm_lines(r: Report) -> list[str]:
    """The GEO-Bench-2 aggregation: IQM of normalised scores per model, its interval, and the weak ones."""
    if not r.iqm:
        return []
    pct = round(100 * r.ci_level)
    out = [
        "",
        f"## GEO-Bench-2 aggregation: IQM of normalised scores ({pct}% stratified bootstrap CI over seeds)",
        "",
        "Each task's headline scores are min-max normalised over every run in this report (0 = its lowest run, "
        "1 = its highest); the IQM is the 25% trimmed mean over all runs of all tasks; the interval redraws the "
        f"seeds within each task. Per-run rows: `{CSV_FILE}` (the GEO-Bench-2 leaderboard's columns).",
        "",
        "| model | IQM | CI low | CI high | n tasks | n seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in r.iqm:
        cells = ["—" if math.isnan(v) else f"{v:.3f}" for v in (row.iqm, row.lo, row.hi)]
        out.append(f"| {row.model} | " + " | ".join(cells) + f" | {row.n_tasks} | {row.n_seeds} |")
    if r.few_seeds:
        weak = ", ".join(f"{m} ({min(d.values())})" for m, d in r.few_seeds.items())
        out += ["", f"- **Weak intervals**: fewer than {r.min_seeds} seeds per task (GEO-Bench-2 asks for 5) for "
                    f"{weak}; so few draws understate the spread."]
    flat = [t for t in r.tasks if t not in r.norm_ranges or r.norm_ranges[t][0] == r.norm_ranges[t][1]]
    if flat:
        out.append(f"- Left out of the IQM, every run scores the same (no range to normalise): {', '.join(flat)}.")
    for row in r.iqm:
        if row.missing:
            out.append(f"- {row.model}: no IQM, no results on {', '.join(row.missing)}.")
    return out


def _missing_lines(r: Report) -> list[str]:
    """The results that were expected but not found."""
    return ["", "## Missing results", "", *[f"- {m}" for m in r.missing]] if r.missing else []


def _table_lines(r: Report) -> list[str]:
    """The table: a row per model, a column per ``task/metric`` and ARP; bold marks the best of a column."""
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
    return lines


def _bootstrap_lines(r: Report) -> list[str]:
    """The bootstrap table: each model's headline difference to the reference per task, and each task's MDD."""
    out = [
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
    return out


def _notes(r: Report) -> list[str]:
    """What the intervals resample, the tasks that rank no model, the tasks outside ARP."""
    pooled = ", ".join(f"{m} ({len(v)})" for m, v in r.pretrainings.items())
    out = ["", "\\* the interval excludes 0. Intervals resample test samples and fine-tuning seeds (paired)" + (
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
    return out


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
    """Write report.csv, bootstrap.csv, report.md, report.json, radar.png and (with the GEO-Bench-2 aggregation)
    results_and_parameters.csv atomically; return the report with their paths."""
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
    if report.leaderboard:
        paths["leaderboard_csv"] = write_csv(out / CSV_FILE, report.leaderboard)
    final = Report(**{**report.__dict__, "paths": paths})
    write_json(paths["json"], final.to_json())
    return final
