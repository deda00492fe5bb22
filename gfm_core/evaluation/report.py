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
- **GEO-Bench-2 aggregation** (:mod:`gfm_core.evaluation.geobench`, ``evaluate.iqm``): beside ARP, the IQM over
  tasks of min-max normalised scores with stratified bootstrap intervals, and every run as a row of the
  leaderboard's ``results_and_parameters.csv``; (model, task) pairs under ``evaluate.min_seeds`` runs are flagged.
- **Protocol**: every fine-tuning result of one report shares ``finetune.protocol`` and ``finetune.scoring``
  (mixed results are refused); the report states them.
- **Outputs** (atomic): ``report.csv`` (the table + ARP), ``bootstrap.csv``, ``report.md``, ``report.json``,
  ``radar.png`` (headline metric relative to the baseline, in %, per task) and ``results_and_parameters.csv``.

This module is the stage's entry point and the public face of the report; the pieces live in
:mod:`~gfm_core.evaluation.report_data` (what the report holds, ARP), :mod:`~gfm_core.evaluation.report_builder`
(runs -> report) and :mod:`~gfm_core.evaluation.report_render` (Markdown, CSV, PNG, the files).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gfm_core.config import Params
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.evaluation.bootstrap import bootstrap_draws, bootstrap_values, paired_bootstrap
from gfm_core.evaluation.report_builder import build_report
from gfm_core.evaluation.report_data import BootstrapCI, Report, RunScores, average_relative_performance
from gfm_core.evaluation.report_render import bootstrap_csv, radar_png, to_csv, to_markdown, write_report

log = logging.getLogger(__name__)


def load_run(result_json: str | Path) -> RunScores:
    """A run's metrics (``result.json``) and per-sample statistics (``scores.parquet``)."""
    from gfm_core.evaluation.results import load_result, load_scores

    res = load_result(result_json)
    ids, stats = load_scores(
        res.scores if res.scores.is_absolute() else Path(result_json).parent / res.scores.name
    )
    return RunScores(res.task, res.head, res.model, res.seed, res.headline, dict(res.metrics), ids, stats,
                     res.backbone_sha256, Path(result_json), protocol=res.protocol, scoring=res.scoring,
                     label_fraction=res.label_fraction)


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
    from gfm_core.evaluation.geobench import recipes
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
            runs.extend(trivial_scores(params.task(t), ft.seeds, "val" if ft.scoring == "paper" else "test"))
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
        iqm=ev.iqm,
        min_seeds=ev.min_seeds,
        recipes=recipes(ft),
    )
    report = write_report(report, ev.out_dir)
    log.info("evaluation report: %s", report.paths["markdown"])
    return report


__all__ = [
    "BootstrapCI",
    "Report",
    "RunScores",
    "average_relative_performance",
    "bootstrap_csv",
    "bootstrap_draws",
    "bootstrap_values",
    "build_report",
    "evaluate_results",
    "load_run",
    "paired_bootstrap",
    "radar_png",
    "run_evaluation",
    "to_csv",
    "to_markdown",
    "write_report",
]
