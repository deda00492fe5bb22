"""Build the evaluation report from runs: pool rows, check the runs pair, aggregate, ARP, paired bootstrap.

The report's contents are described in :mod:`gfm_core.evaluation.report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.evaluation.bootstrap import group_mean, paired_bootstrap
from gfm_core.evaluation.geobench import (
    MIN_SEEDS,
    LeaderboardRow,
    Recipe,
    decoder_name,
    frozen_or_full_ft,
    iqm_table,
    min_max_ranges,
    normalise,
    partition_name,
)
from gfm_core.evaluation.report_data import BootstrapCI, Report, RunScores, average_relative_performance
from gfm_core.evaluation.trivial import TRIVIAL
from gfm_core.task_heads import get_head

log = logging.getLogger(__name__)

Unit = tuple[int, int]  # (pretraining run, fine-tuning seed)
ByKey = dict[tuple[str, str], dict[Unit, RunScores]]  # (model, task) -> unit -> run


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
    iqm: bool = True,
    min_seeds: int = MIN_SEEDS,
    recipes: Mapping[str, Recipe] | None = None,
) -> Report:
    """Aggregate runs into the report (no files written; see :func:`~gfm_core.evaluation.report_render.write_report`).

    ``pretraining_seeds`` maps a row name to the models it pools, one per pretraining run
    (:mod:`gfm_core.evaluation.report`). With ``iqm`` the GEO-Bench-2 aggregation is added
    (:mod:`gfm_core.evaluation.geobench`; ``recipes``: each task's fine-tuning settings for its CSV, ``min_seeds``:
    fewer runs of a (model, task) mark its interval weak).

    Raises:
        ConfigError: no runs, the baseline/reference is not among the models, or two pooled rows hold different
            numbers of pretraining runs (they pair by position).
        DataValidationError: runs of one task were tested on different samples (paired stats impossible), runs
            of one model started from different backbone bytes, or the runs mix protocols or scorings.
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
    by_key, heads, headlines = _group_runs(runs, models, tasks)
    tasks = [t for t in tasks if t in heads]
    _check_same_samples(by_key, tasks)
    backbones = _check_same_backbone(by_key, pooled)
    protocol, scoring = _one_protocol(by_key)

    columns = [(t, m) for t in tasks for m in dict.fromkeys((headlines[t], *get_head(heads[t]).columns))]
    mean, std, seeds = _aggregate(by_key, models, tasks, columns)
    excluded = dict(arp_exclude or {})
    head_scores = {m: {t: mean[m][f"{t}/{headlines[t]}"] for t in tasks if t not in excluded} for m in models}
    arp = {m: average_relative_performance(head_scores[m], head_scores[baseline]) for m in models}
    cis = _bootstrap_cis(by_key, models, tasks, heads, headlines, reference, n_bootstrap, ci, seed)
    geo = _geobench(by_key, models, tasks, headlines, pooled, recipes or {}, (n_bootstrap, ci, seed), min_seeds
                    ) if iqm else {}
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
        protocol=protocol,
        scoring=scoring,
        **geo,
    )


def _group_runs(
    runs: Sequence[RunScores], models: Sequence[str], tasks: Sequence[str]
) -> tuple[ByKey, dict[str, str], dict[str, str]]:
    """The reported runs by (model, task) and unit, and each task's head and headline metric.

    Raises:
        DataValidationError: runs of one task disagree on its head or headline metric.
    """
    by_key: ByKey = {}
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
    return by_key, heads, headlines


def _aggregate(
    by_key: ByKey, models: Sequence[str], tasks: Sequence[str], columns: Sequence[tuple[str, str]]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, dict[str, list[int]]]]:
    """Per model: the mean and std of every ``task/metric`` column over its runs, and the seeds of each task."""
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
    return mean, std, seeds


def _bootstrap_cis(
    by_key: ByKey,
    models: Sequence[str],
    tasks: Sequence[str],
    heads: Mapping[str, str],
    headlines: Mapping[str, str],
    reference: str,
    n_bootstrap: int,
    ci: float,
    seed: int,
) -> dict[str, dict[str, BootstrapCI]]:
    """``model -> task ->`` the paired bootstrap of its headline difference to ``reference`` (reference omitted)."""
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
    return cis


def _pair_units(
    a: Mapping[Unit, RunScores], b: Mapping[Unit, RunScores], name_a: str, name_b: str
) -> list[tuple[Unit, Unit, int]]:
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


def _check_same_backbone(by_key: ByKey, pooled: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
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
            for sha, sha_runs in by_sha.items():
                name = f"sha256 {sha}" if sha else "unrecorded backbone (written before backbone hashes)"
                files = ", ".join(str(r.source or f"{r.task}/{r.model}/seed_{r.seed}") for r in sha_runs)
                lines.append(f"  {name}: {files}")
            raise DataValidationError(
                f"model {model}: its fine-tuning results started from different backbone bytes, so they "
                f"cannot be reported together:\n" + "\n".join(lines) +
                f"\nThe backbone changed between fine-tuning runs; re-run `gfm finetune --model {model}` (every "
                f"task and seed), then `gfm evaluate`"
            )
        out[model] = next(iter(by_sha))
    return out


def _check_same_samples(by_key: ByKey, tasks: Sequence[str]) -> None:
    """Raise :class:`DataValidationError` when two runs of one task were tested on different samples."""
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


def _one_protocol(by_key: ByKey) -> tuple[str | None, str | None]:
    """The ``finetune.protocol`` and ``finetune.scoring`` every fine-tuning run shares (None: none recorded).

    Raises:
        DataValidationError: the runs mix protocols or scorings (one report, one protocol: its numbers compare).
    """
    found: list[str | None] = []
    for attr in ("protocol", "scoring"):
        seen: dict[str, list[RunScores]] = {}
        for runs in by_key.values():
            for r in runs.values():
                value = getattr(r, attr)
                if value is not None:
                    seen.setdefault(value, []).append(r)
        if len(seen) > 1:
            parts = "; ".join(f"{v}: {len(rs)} run(s), e.g. {_where(rs[0])}" for v, rs in seen.items())
            raise DataValidationError(
                f"the fine-tuning results mix finetune.{attr} values ({parts}); one report holds one protocol and "
                f"scoring. Re-run `gfm finetune` for every model, task and seed under one finetune.{attr}, or "
                f"report each set of results on its own (evaluate.models, evaluate.out_dir)"
            )
        found.append(next(iter(seen), None))
    return found[0], found[1]


def _where(r: RunScores) -> str:
    return str(r.source or f"{r.task}/{r.model}/seed_{r.seed}")


def _geobench(
    by_key: ByKey,
    models: Sequence[str],
    tasks: Sequence[str],
    headlines: Mapping[str, str],
    pooled: Mapping[str, Sequence[str]],
    recipes: Mapping[str, Recipe],
    boot: tuple[int, float, int],
    min_seeds: int,
) -> dict[str, Any]:
    """The report fields of the GEO-Bench-2 aggregation: the CSV rows, the normalising ranges, the IQM table
    (``boot`` = n_bootstrap, ci, seed) and the (model, task) pairs with fewer than ``min_seeds`` runs."""
    units = {k: sorted(got) for k, got in by_key.items()}
    scores = {k: [by_key[k][u].metrics.get(headlines[k[1]], math.nan) for u in us] for k, us in units.items()}
    ranges = min_max_ranges(scores)
    normed = normalise(scores, ranges)
    rows = [_leaderboard_row(by_key[(m, t)][u], headlines[t], pooled, recipes.get(t), float(normed[(m, t)][i]))
            for t in tasks for m in models for i, u in enumerate(units.get((m, t), []))]
    few = {m: {t: n for t in tasks if 0 < (n := len(units.get((m, t), []))) < min_seeds} for m in models}
    few = {m: d for m, d in few.items() if d}
    if few:
        log.warning("fewer than %d seeds per task (GEO-Bench-2 asks for %d), the IQM intervals are weak: %s",
                    min_seeds, MIN_SEEDS, "; ".join(f"{m}: {d}" for m, d in few.items()))
    n_bootstrap, ci, seed = boot
    table = iqm_table(normed, models, tasks, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    return dict(iqm=table, leaderboard=rows, norm_ranges=ranges, few_seeds=few, min_seeds=min_seeds)


def _leaderboard_row(
    r: RunScores, headline: str, pooled: Mapping[str, Sequence[str]], recipe: Recipe | None, normalised: float
) -> LeaderboardRow:
    """A run as a ``results_and_parameters.csv`` row (:mod:`gfm_core.evaluation.geobench`: the columns)."""
    trivial = r.model == TRIVIAL  # no network trained: no decoder, no training settings
    rec = None if trivial else recipe
    return LeaderboardRow(
        dataset=r.task,
        metric=headline,
        experiment_name=pooled[r.model][r.pretrain] if r.model in pooled else r.model,
        partition_name=partition_name(r.label_fraction),
        backbone=r.model,
        decoder="" if trivial else rec.decoder if rec else decoder_name(r.head),
        batch_size_selection="" if trivial else "fixed",
        frozen_or_full_ft=frozen_or_full_ft(r.protocol),
        early_stop_patience=None,
        n_trials=None if trivial else 0,
        seed=r.seed,
        data_percentages=round(100 * r.label_fraction),
        batch_size=rec.batch_size if rec else None,
        weight_decay=rec.weight_decay if rec else None,
        lr=rec.lr if rec else None,
        test_metric=float(r.metrics.get(headline, math.nan)),
        protocol=r.protocol or "",
        scoring=r.scoring or "",
        head=r.head,
        normalized=None if math.isnan(normalised) else normalised,
    )
