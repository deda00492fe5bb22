"""Scoring a fine-tuned objective (``finetune.scoring``): one evaluation pass, and the paper's best-epoch protocol.

``test`` (the default) scores the test split once after training (:func:`evaluate_objective`). ``paper`` does
what GFM's ``main_finetune.py`` does: ``validate()`` on the val split after every epoch and report the maximum
over epochs (``max_accuracy``). :class:`BestEpoch` is that, as a :func:`~gfm_core.training.loop.fit` callback:
after every ``steps_per_epoch`` optimizer steps (and the last step) it scores the val split on rank 0, appends
``{"step", "val_<metric>": ...}`` to the run's ``metrics.jsonl`` and keeps the epoch with the highest
headline (the first of equals, as the paper's strict ``acc1 > max_accuracy``; every headline is
higher-is-better). The best epoch's per-sample statistics are written to ``scores.parquet`` as it is found, so a
resumed run still has them.

BigEarthNet: the paper's ``validate()`` calls torchmetrics' binary ``AveragePrecision`` on each val batch
(micro AP over the batch's sample x label pairs) and averages the batch values weighted by batch size. That
number depends on the batch size, and a bootstrap cannot resample it, so the headline ``mAP`` stays the pooled
micro AP over the whole split and the paper's number is recorded beside it as ``mAP_batch``
(:func:`batch_averaged_map`, batches of ``finetune.eval_batch_size``); the best epoch is chosen by the headline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multilabel_average_precision

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.evaluation.metrics import TaskMetrics
from gfm_core.evaluation.results import SCORES_FILE, save_scores, scores_meta
from gfm_core.training.metrics import METRICS_FILE, append_record

log = logging.getLogger(__name__)

VAL_PREFIX = "val_"  # metrics.jsonl keys of the per-epoch val evaluations


def evaluate_objective(
    objective: Any, loader: DataLoader, metrics: TaskMetrics, device: torch.device
) -> tuple[dict[str, float], list[str], dict[str, np.ndarray]]:
    """One pass of a :class:`~gfm_core.objectives.Finetune` objective over ``loader`` in eval mode:
    ``(metrics, sample ids, per-sample stats)``."""
    from gfm_core.training.backends import move_to

    was_training = objective.training
    objective.eval()
    ids: list[str] = []
    try:
        for batch in loader:
            batch = move_to(batch, device)
            metrics.update(objective.predict(batch), batch[objective.target])
            ids.extend(batch["id"])
    finally:
        objective.train(was_training)
    return metrics.compute(), ids, metrics.per_sample()


def batch_averaged_map(stats: Mapping[str, np.ndarray], batch_size: int) -> float:
    """The paper's BigEarthNet number: micro AP (%) of each batch of ``batch_size`` samples, in order, averaged
    weighted by batch size (module docstring)."""
    scores, targets = stats["scores"], stats["targets"]
    values, sizes = [], []
    for start in range(0, len(scores), batch_size):
        s = torch.from_numpy(np.ascontiguousarray(scores[start : start + batch_size]))
        t = torch.from_numpy(np.ascontiguousarray(targets[start : start + batch_size]))
        values.append(100 * float(multilabel_average_precision(s, t, num_labels=s.shape[1], average="micro")))
        sizes.append(len(s))
    return float(np.average(values, weights=sizes))


def best_record(records: list[dict[str, float]], headline: str) -> dict[str, float] | None:
    """The first record with the highest ``val_<headline>`` (None when there is none)."""
    key, best = VAL_PREFIX + headline, None
    for r in records:
        if key in r and (best is None or r[key] > best[key]):
            best = r
    return best


class BestEpoch:
    """``scoring: paper`` as a fit callback: score val after every epoch, keep the best (module docstring).

    Args:
        backend: the run's backend (its ``module`` and ``device`` are read when scoring).
        loader: the val split, in a fixed order.
        new_metrics: a fresh metric accumulator of the task's head.
        headline: the metric that picks the best epoch.
        steps_per_epoch: optimizer steps per pass over the training set.
        total_steps: the run's last step (scored too when it ends inside an epoch).
        out_dir: the run folder (``metrics.jsonl``, ``scores.parquet``).
        meta: written into ``scores.parquet``'s metadata (task, model, seed, ...).
        paper_batch: the batch size of ``mAP_batch`` (multilabel heads).
    """

    def __init__(self, backend: Any, loader: DataLoader, new_metrics: Callable[[], TaskMetrics], headline: str, *,
                 steps_per_epoch: int, total_steps: int, out_dir: Path, meta: Mapping[str, Any],
                 paper_batch: int) -> None:
        self.backend, self.loader, self.new_metrics, self.headline = backend, loader, new_metrics, headline
        self.steps_per_epoch, self.total_steps, self.paper_batch = steps_per_epoch, total_steps, paper_batch
        self.metrics_path, self.scores_path, self.meta = out_dir / METRICS_FILE, out_dir / SCORES_FILE, meta
        self.records: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None

    def on_start(self, step: int) -> None:
        """Pick up the evaluations a resumed run made before ``step`` (fit has trimmed later ones)."""
        key = VAL_PREFIX + self.headline
        self.records = [r for r in _read_records(self.metrics_path) if key in r] if step > 0 else []
        self.best = best_record(self.records, self.headline)

    def on_step_end(self, step: int) -> None:
        """Score val at the end of every epoch and at the last step."""
        if step % self.steps_per_epoch == 0 or step == self.total_steps:
            self.score(step)

    def score(self, step: int) -> dict[str, float]:
        """Score the val split with the weights after ``step``; record it, and keep it when it is the best."""
        devices = [self.backend.device] if self.backend.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # training's random stream is not disturbed
            values, ids, stats = evaluate_objective(self.backend.module, self.loader, self.new_metrics(),
                                                    self.backend.device)
        if self.headline not in values:
            raise ConfigError(f"headline {self.headline!r} is not one of the val metrics {sorted(values)}")
        if "scores" in stats and "targets" in stats:  # multilabel: the paper's per-batch average too
            values["mAP_batch"] = batch_averaged_map(stats, self.paper_batch)
        record = {"step": step, **{VAL_PREFIX + k: v for k, v in values.items()}}
        append_record(self.metrics_path, record)
        self.records.append(record)
        if self.best is None or record[VAL_PREFIX + self.headline] > self.best[VAL_PREFIX + self.headline]:
            self.best = record
            save_scores(self.scores_path, ids, stats, {**self.meta, "split": "val", "step": step})
        log.info("step %d: val %s %.4g (best %.4g at step %d)", step, self.headline, values[self.headline],
                 self.best[VAL_PREFIX + self.headline], int(self.best["step"]))
        return values

    def result(self) -> tuple[dict[str, float], int]:
        """``(metrics, step)`` of the best epoch.

        Raises:
            CheckpointError: nothing was scored, or ``scores.parquet`` holds another step's statistics.
        """
        if self.best is None:
            raise CheckpointError(f"{self.metrics_path}: no val evaluation recorded (scoring: paper)")
        step = int(self.best["step"])
        if scores_meta(self.scores_path).get("step") != step:
            raise CheckpointError(
                f"{self.scores_path}: not the per-sample scores of the best val epoch (step {step}); re-run "
                f"gfm finetune for this result without resume"
            )
        metrics = {k[len(VAL_PREFIX):]: v for k, v in self.best.items() if k.startswith(VAL_PREFIX)}
        return metrics, step


def _read_records(path: Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` (none when it does not exist; unreadable lines skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash (fit drops it on resume too)
            continue
    return records
