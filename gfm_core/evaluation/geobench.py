"""GEO-Bench-2-style aggregation beside the paper's ARP: the leaderboard's per-run CSV, min-max normalised scores,
the IQM over tasks and its stratified bootstrap interval.

Sources (facts read from the repositories; no code taken): the GEO-Bench-2 leaderboard,
The-AI-Alliance/GEO-Bench-2-Leaderboard (``README.md``, ``utils/constants.py``, ``utils/input_validation.py``,
``utils/compute_tools.py``, ``utils/compile_results.py``, ``results/*/results_and_parameters.csv``), and rliable
(google-research/rliable: ``rliable/metrics.py`` ``aggregate_iqm``, ``library.py`` ``StratifiedBootstrap`` and
``get_interval_estimates``), whose IQM and stratified bootstrap GEO-Bench (v1 and 2) follow.

**results_and_parameters.csv**: one row per (model, task, seed) run. The leaderboard's submission check requires 16
columns (8 text, 5 integer, 3 float; it keeps only those and ignores others); they come first, in its order, then
four of ours. What each means there, and what we write:

- ``dataset`` (the benchmark dataset): the task name (``finetune.tasks[].name``).
- ``Metric`` (``Overall_Accuracy``, ``Multilabel_F1_Score``, ``Multiclass_Jaccard_Index``, ``RMSE``): the task's
  headline metric under our name (``acc``, ``mAP``, ``mIoU``, ``F1``, ``PSNR``); no renaming, they differ.
- ``experiment_name`` (the MLflow experiment, or one name for all results of a backbone): the fine-tuned model's
  name; for a pooled row (``evaluate.pretraining_seeds``) the member model, i.e. the pretraining run.
- ``partition name`` (the training partition, ``1.00x train``): ``label_fraction`` written the same way.
- ``backbone`` (the backbone key the leaderboard groups by): the report row (model).
- ``decoder`` (``UNet``, ``smp_Unet``): ``linear`` for the classification heads, ``FPN`` for the dense ones
  (:mod:`gfm_core.models.heads`); empty for the trivial row.
- ``batch_size_selection`` (``fixed`` or ``optimized`` by the hyperparameter search): ``fixed``.
- ``frozen_or_full_ft`` (``frozen`` | ``full_ft``): ``full_ft`` for ``finetune.protocol: finetune``, ``frozen`` for
  ``frozen`` and ``linear`` (the backbone is not trained); empty for the trivial row.
- ``early_stop_patience``: **empty**, we do not stop early.
- ``n_trials`` (hyperparameter-search trials): ``0``, we do no search.
- ``Seed``: the fine-tuning seed.
- ``data_percentages`` (integer % of the train split): ``round(100 * label_fraction)``.
- ``batch_size``, ``weight_decay``, ``lr``: the fine-tuning settings as configured (``lr`` is ``finetune.base_lr``,
  which the loop multiplies by global batch / 512 under ``lr_scaling: linear``); **empty** for the trivial row,
  and when the report is built without params (:func:`~gfm_core.evaluation.report_builder.build_report` alone).
- ``test metric``: the headline score as the report shows it (percent for acc/mAP/mIoU/F1, dB for PSNR; the
  leaderboard's own files hold fractions).
- ours: ``protocol`` and ``scoring`` (``finetune.protocol`` / ``finetune.scoring``; empty for the trivial row),
  ``head``, and ``normalized test metric`` (below; empty where undefined). :func:`read_csv` also reads the
  leaderboard's own files (ours missing: empty).

**Normalisation** (the leaderboard's ``Normalizer``): per task ``(x - min) / (max - min)``, ``min`` and ``max``
over every run (all seeds) of the normalising set. The leaderboard's set is a few reference submissions; ours is
every run of the report (the trivial row anchors the low end). A task whose runs all score the same has no range:
its normalised scores are empty and it is left out of the IQM.

**IQM**: the 25 % trimmed mean of all normalised runs of all tasks pooled, i.e. ``scipy.stats.trim_mean(x, 0.25)``
of the flattened runs x tasks matrix, which cuts ``int(0.25 n)`` values from each end (rliable ``aggregate_iqm``;
the leaderboard's ``iqm``). A model missing a task gets none, as the leaderboard leaves such a backbone out.

**Stratified bootstrap** (rliable ``StratifiedBootstrap``; the leaderboard's ``bootstrap_iqm_aggregate`` groups by
backbone and dataset): each replicate redraws, independently within each task, that task's runs with replacement
(as many as it has), and recomputes the IQM. The interval is the percentile interval (rliable's default method);
the point estimate is the IQM of the data (rliable), where the leaderboard shows the mean of 100 bootstrap IQMs.

**Seeds**: the leaderboard asks for 5 per (backbone, dataset) (``REQUIRED_SEEDS``); fewer mark the intervals weak.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import trim_mean

from gfm_core.config import FinetuneCfg
from gfm_core.config.downstream import DECODER_HEADS
from gfm_core.errors import DataValidationError
from gfm_core.io import write_text

CSV_FILE = "results_and_parameters.csv"
MIN_SEEDS = 5  # the leaderboard's REQUIRED_SEEDS
IQM_CUT = 0.25  # share trimmed from each end

#: The CSV's columns: the leaderboard's 16 (its order), then ours.
LEADERBOARD_COLUMNS = (
    "dataset", "Metric", "experiment_name", "partition name", "backbone", "decoder", "batch_size_selection",
    "frozen_or_full_ft", "early_stop_patience", "n_trials", "Seed", "data_percentages", "batch_size",
    "weight_decay", "lr", "test metric",
)
COLUMNS = (*LEADERBOARD_COLUMNS, "protocol", "scoring", "head", "normalized test metric")


@dataclass(frozen=True)
class LeaderboardRow:
    """One (model, task, seed) run as a row of ``results_and_parameters.csv`` (fields in :data:`COLUMNS` order)."""

    dataset: str
    metric: str
    experiment_name: str
    partition_name: str
    backbone: str
    decoder: str
    batch_size_selection: str
    frozen_or_full_ft: str
    early_stop_patience: int | None
    n_trials: int | None
    seed: int
    data_percentages: int
    batch_size: int | None
    weight_decay: float | None
    lr: float | None
    test_metric: float
    protocol: str = ""
    scoring: str = ""
    head: str = ""
    normalized: float | None = None


_FIELDS = tuple(fields(LeaderboardRow))
_KIND = {"str": str, "int": int, "int | None": int, "float": float, "float | None": float}
_REQUIRED = {"seed", "data_percentages", "test_metric"}  # numbers every row has


def to_csv(rows: Sequence[LeaderboardRow]) -> str:
    """The rows as CSV text (None as an empty cell, floats exactly: ``repr``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if v is None else repr(float(v)) if isinstance(v, float) else v
                    for v in (getattr(r, f.name) for f in _FIELDS)])
    return buf.getvalue()


def write_csv(path: str | Path, rows: Sequence[LeaderboardRow]) -> Path:
    """Write ``results_and_parameters.csv`` atomically."""
    return write_text(path, to_csv(rows))


def read_csv(path: str | Path) -> list[LeaderboardRow]:
    """The rows of a ``results_and_parameters.csv`` (ours, or the leaderboard's: extra columns are ignored).

    Raises:
        DataValidationError: the file is missing, lacks a leaderboard column, or a cell is not of its type.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: results CSV not found (gfm evaluate writes it)")
    reader = csv.DictReader(io.StringIO(path.read_text()))
    absent = [c for c in LEADERBOARD_COLUMNS if c not in (reader.fieldnames or ())]
    if absent:
        raise DataValidationError(f"{path}: missing leaderboard column(s) {absent}")
    rows = []
    for i, raw in enumerate(reader, start=2):  # line 1 is the header
        values = {}
        for f, col in zip(_FIELDS, COLUMNS, strict=True):
            values[f.name] = _cell(raw.get(col) or "", f.name, str(f.type), f"{path}: line {i}, column {col!r}")
        rows.append(LeaderboardRow(**values))
    return rows


def _cell(text: str, name: str, kind: str, where: str) -> Any:
    """One cell's value: text as is; numbers parsed (empty: None); integers may be written ``10.0``."""
    typ = _KIND[kind]
    if typ is str:
        return text
    if text == "":
        if name in _REQUIRED:
            raise DataValidationError(f"{where}: empty, a number is required")
        return None
    try:
        value = float(text)
    except ValueError as e:
        raise DataValidationError(f"{where}: {text!r} is not a number") from e
    if typ is float:
        return value
    if not value.is_integer():
        raise DataValidationError(f"{where}: {text!r} is not an integer")
    return int(value)


# ------------------------------------------------------------------------------------------------ statistics

RunKey = tuple[str, str]  # (model, task)


def min_max_ranges(scores: Mapping[RunKey, Sequence[float]]) -> dict[str, tuple[float, float]]:
    """``task -> (min, max)`` over every run of every model (NaN scores skipped; tasks without any left out)."""
    by_task: dict[str, list[float]] = {}
    for (_, task), vals in scores.items():
        by_task.setdefault(task, []).extend(v for v in vals if not math.isnan(v))
    return {t: (float(min(v)), float(max(v))) for t, v in by_task.items() if v}


def normalise(
    scores: Mapping[RunKey, Sequence[float]], ranges: Mapping[str, tuple[float, float]]
) -> dict[RunKey, np.ndarray]:
    """Each run's ``(x - min) / (max - min)`` of its task (NaN where the task has no range or the score is NaN)."""
    out = {}
    for (model, task), vals in scores.items():
        lo, hi = ranges.get(task, (math.nan, math.nan))
        x = np.asarray(vals, np.float64)
        out[(model, task)] = (x - lo) / (hi - lo) if hi > lo else np.full(len(x), math.nan)
    return out


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: the mean after cutting ``int(0.25 n)`` values from each end (NaN when empty)."""
    x = np.asarray(values, np.float64).ravel()
    return float(trim_mean(x, IQM_CUT)) if x.size else math.nan


def stratified_bootstrap_iqm(
    per_task: Sequence[Sequence[float] | np.ndarray], *, n_bootstrap: int, ci: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of the IQM over replicates that redraw each task's runs with replacement, independently.

    The draws: ``rng = numpy.random.default_rng(seed)``; then, task by task in order, an index array
    ``rng.integers(0, n_t, (n_bootstrap, n_t))`` into that task's ``n_t`` runs; replicate ``b`` pools row ``b``
    of every task.
    """
    if not per_task:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(x, np.float64) for x in per_task]
    draws = np.concatenate([x[rng.integers(0, len(x), (n_bootstrap, len(x)))] for x in arrays], axis=1)
    replicates = trim_mean(draws, IQM_CUT, axis=1)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(replicates, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class IQMRow:
    """A model's IQM over tasks of its normalised scores, with the stratified bootstrap interval."""

    model: str
    iqm: float
    lo: float
    hi: float
    n_tasks: int
    n_seeds: int  # the fewest runs any of its tasks has
    missing: tuple[str, ...] = ()  # tasks it has no results on (then no IQM)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items() if k != "model"}


def iqm_table(
    normalised: Mapping[RunKey, np.ndarray],
    models: Sequence[str],
    tasks: Sequence[str],
    *,
    n_bootstrap: int,
    ci: float,
    seed: int,
) -> list[IQMRow]:
    """Per model: the IQM over the tasks that have a range, and its interval (seeded with ``seed`` per model)."""
    scored = [t for t in tasks if any(np.isfinite(v).any() for (_, task), v in normalised.items() if task == t)]
    rows = []
    for m in models:
        per_task = {t: x[np.isfinite(x)] for t in scored if (x := normalised.get((m, t))) is not None}
        per_task = {t: x for t, x in per_task.items() if len(x)}
        missing = tuple(t for t in scored if t not in per_task)
        n_seeds = min((len(x) for x in per_task.values()), default=0)
        if missing or not per_task:
            rows.append(IQMRow(m, math.nan, math.nan, math.nan, len(per_task), n_seeds, missing))
            continue
        runs = list(per_task.values())
        lo, hi = stratified_bootstrap_iqm(runs, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        rows.append(IQMRow(m, iqm(np.concatenate(runs)), lo, hi, len(runs), n_seeds))
    return rows


# ------------------------------------------------------------------------------------------------ the runs' settings


@dataclass(frozen=True)
class Recipe:
    """A task's fine-tuning settings, for the leaderboard's training columns (None: unknown, an empty cell)."""

    decoder: str
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None


def decoder_name(head: str, decoder: str = "fpn") -> str:
    """The decoder of a head (:mod:`gfm_core.models.heads`): a linear classifier, the configured decoder of the
    segmentation and change heads (``FPN``/``UPerNet``), the FPN of super-resolution."""
    if head in ("classification", "multilabel"):
        return "linear"
    return {"upernet": "UPerNet"}.get(decoder, "FPN") if head in DECODER_HEADS else "FPN"


def recipes(cfg: FinetuneCfg) -> dict[str, Recipe]:
    """``task -> Recipe`` as ``finetune`` configures it (``lr``: ``base_lr`` before ``lr_scaling``)."""
    return {t.name: Recipe(decoder_name(t.head, t.decoder or cfg.decoder), t.batch_size or cfg.batch_size,
                           cfg.base_lr, cfg.weight_decay) for t in cfg.tasks}


def frozen_or_full_ft(protocol: str | None) -> str:
    """The leaderboard's ``frozen_or_full_ft`` of a ``finetune.protocol`` (empty: not a fine-tuning run)."""
    if protocol is None:
        return ""
    return "full_ft" if protocol == "finetune" else "frozen"


def partition_name(label_fraction: float) -> str:
    """The leaderboard's ``partition name`` of a label fraction (``1.00x train``)."""
    return f"{label_fraction:.2f}x train"
