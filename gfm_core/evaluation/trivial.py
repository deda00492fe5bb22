"""Trivial predictors per task head: the row every learnt model must beat for its score to mean anything.

Each is fitted on the task's train split only (nothing from test) and scored on the test split with the same
metrics and per-sample statistics as a fine-tuned model, so it joins the report as the model ``trivial``:

- classification: the majority class of the train split;
- multi-label: each label's train prevalence as its constant score;
- segmentation: the majority class of the train pixels, everywhere;
- change: the rule ``mean_bands |A - B| > t``, with ``t`` the train split's F1-optimal threshold;
- super-resolution: bicubic upsampling of the low-resolution input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from gfm_core.config import TaskCfg
from gfm_core.evaluation.metrics import build_metrics
from gfm_core.evaluation.report_data import RunScores
from gfm_core.task_heads import HeadRegistry, get_head

TRIVIAL = "trivial"
Predict = Callable[[dict[str, Any]], Tensor]


def _batches(task: TaskCfg, split: str) -> tuple[Any, DataLoader]:
    from gfm_core.data.tasks.dataset import TaskDataset

    probe = TaskDataset(task, split, mean=(0.0,), std=(1.0,), cache=False)
    c = probe.channels
    ds = TaskDataset(task, split, mean=(0.0,) * c, std=(1.0,) * c, cache=False)  # [0, 1] pixels, unnormalised
    return ds, DataLoader(ds, batch_size=32, shuffle=False)


class TrivialPredictor:
    """A head's trivial predictor: ``fit(train_loader, num_outputs, task)`` returns ``batch -> predictions``."""

    head = ""

    @staticmethod
    def fit(loader: DataLoader, k: int, task: TaskCfg) -> Predict:
        """Fit on the train split's batches (``k``: the head's number of outputs)."""
        raise NotImplementedError


#: Head name -> its trivial predictor (``@TRIVIAL_PREDICTORS.register``; the names are the rows of ``HEADS``).
TRIVIAL_PREDICTORS: HeadRegistry[type[TrivialPredictor]] = HeadRegistry("trivial predictor")


@TRIVIAL_PREDICTORS.register
class MajorityClass(TrivialPredictor):
    """The majority class of the train split, as a one-hot score."""

    head = "classification"

    @staticmethod
    def fit(loader: DataLoader, k: int, task: TaskCfg) -> Predict:
        """Count the train labels."""
        counts = torch.zeros(k)
        for b in loader:
            counts += torch.bincount(b["label"], minlength=k)
        onehot = F.one_hot(counts.argmax(), k).float()
        return lambda b: onehot.expand(len(b["label"]), -1)


@TRIVIAL_PREDICTORS.register
class LabelPrevalence(TrivialPredictor):
    """Each label's train prevalence as its constant score."""

    head = "multilabel"

    @staticmethod
    def fit(loader: DataLoader, k: int, task: TaskCfg) -> Predict:
        """Average the train label vectors."""
        total, n = torch.zeros(k), 0
        for b in loader:
            total += b["label"].float().sum(0)
            n += len(b["label"])
        prior = total / max(n, 1)
        return lambda b: prior.expand(len(b["label"]), -1)


@TRIVIAL_PREDICTORS.register
class MajorityPixelClass(TrivialPredictor):
    """The majority class of the train pixels, everywhere."""

    head = "segmentation"

    @staticmethod
    def fit(loader: DataLoader, k: int, task: TaskCfg) -> Predict:
        """Count the labelled train pixels (``task.ignore_index`` left out)."""
        counts = torch.zeros(k)
        for b in loader:
            m = b["mask"][b["mask"] != task.ignore_index]
            counts += torch.bincount(m[(m >= 0) & (m < k)], minlength=k)
        major = int(counts.argmax())
        return lambda b: torch.full_like(b["mask"], major)


def _change_score(b: dict[str, Any]) -> Tensor:
    """``mean_bands |A - B|`` at the label's size."""
    d = (b["image"][:, 0] - b["image"][:, 1]).abs().mean(1, keepdim=True)
    return F.interpolate(d, size=b["mask"].shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@TRIVIAL_PREDICTORS.register
class DifferenceThreshold(TrivialPredictor):
    """The rule ``mean_bands |A - B| > t``, ``t`` the train split's F1-optimal threshold."""

    head = "change"

    @staticmethod
    def fit(loader: DataLoader, k: int, task: TaskCfg) -> Predict:
        """Search ``t`` over quantiles of the train differences."""
        scores, truth = [], []
        for b in loader:
            scores.append(_change_score(b).flatten())
            truth.append(b["mask"].flatten().bool())
        s, t = torch.cat(scores), torch.cat(truth)
        step = max(1, len(s) // 4_000_000)  # a fixed stride keeps the threshold search in memory on real splits
        s, t = s[::step], t[::step]
        best, best_f1 = 0.0, -1.0
        for thr in np.quantile(s.numpy(), np.linspace(0.5, 0.995, 60)).tolist():
            p = s > thr
            tp = float((p & t).sum())
            f1 = 2 * tp / max(float(p.sum()) + float(t.sum()), 1.0)
            if f1 > best_f1:
                best, best_f1 = thr, f1
        return lambda b: (_change_score(b) > best).long()


@TRIVIAL_PREDICTORS.register
class Bicubic(TrivialPredictor):
    """Bicubic upsampling of the low-resolution input."""

    head = "superres"

    @staticmethod
    def fit(loader: DataLoader, k: int, task: TaskCfg) -> Predict:
        """Nothing to fit."""
        return lambda b: F.interpolate(b["image"], size=b["target"].shape[-2:], mode="bicubic",
                                       align_corners=False).clamp(0, 1)



def trivial_scores(task: TaskCfg, seeds: Sequence[int], split: str = "test") -> list[RunScores]:
    """The trivial predictor's :class:`~gfm_core.evaluation.report_data.RunScores` on ``task``'s ``split`` (the one
    the models were scored on: ``test``, or ``val`` under ``finetune.scoring: paper``).

    The predictor is deterministic, so the same scores stand for every seed (the report pairs seeds).
    """
    spec = get_head(task.head)
    train, train_loader = _batches(task, "train")
    k = train.num_outputs
    predict = TRIVIAL_PREDICTORS.get(task.head).fit(train_loader, k, task)
    _, test_loader = _batches(task, split)
    metrics = build_metrics(task.head, k, task.ignore_index)
    ids: list[str] = []
    with torch.no_grad():
        for b in test_loader:
            metrics.update(predict(b), b[spec.target])
            ids.extend(b["id"])
    values, stats = metrics.compute(), metrics.per_sample()
    headline = task.headline or spec.headline
    return [RunScores(task.name, task.head, TRIVIAL, s, headline, dict(values), list(ids),
                      {key: np.asarray(v) for key, v in stats.items()}) for s in seeds]
