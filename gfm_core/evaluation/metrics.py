"""Per-task test metrics (torchmetrics) plus per-sample statistics for the paired bootstrap.

Each :class:`TaskMetrics` takes the objective's predictions batch by batch. ``compute()`` returns the
torchmetrics values; ``per_sample()`` returns, for every test sample, the sufficient statistics from which
:func:`metrics_from_stats` recomputes exactly the same values on any resample of the samples:

==============  =====================================  ==========================================  =========
head            metrics (units)                        per-sample statistics                       headline
==============  =====================================  ==========================================  =========
classification  acc: top-1 accuracy (%)                correct [N]                                  acc
multilabel      mAP: micro average precision (%)       scores [N, L], targets [N, L]                mAP
segmentation    mIoU (%), iou_<k> (% if present)       confusion matrix [N, K, K] (target, pred)    mIoU
change          precision, recall, F1 of change (%)    tp, fp, fn [N] (pixels)                      F1
superres        PSNR (dB), SSIM (data range 1)         psnr, ssim [N]                               PSNR
==============  =====================================  ==========================================  =========

mIoU averages the classes that occur in the targets or predictions (torchmetrics' ``MulticlassJaccardIndex``
``average="macro"``); pixels equal to ``ignore_index`` are not scored. Change P/R/F1 pool the pixels of all
samples (torchmetrics' binary metrics, ``multidim_average="global"``); 0 when undefined. PSNR and SSIM are per
image, then averaged (SSIM: Gaussian window 11, sigma 1.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
)
from torchmetrics.functional.classification import multilabel_average_precision
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from gfm_core.errors import ConfigError
from gfm_core.task_heads import HeadRegistry, get_head

Stats = dict[str, np.ndarray]


class TaskMetrics:
    """Accumulates one test pass. Subclasses set ``head``, take ``(num_outputs, ignore_index)`` and implement
    ``update``, ``compute`` and ``from_stats``."""

    head = ""

    def __init__(self) -> None:
        self._rows: dict[str, list[np.ndarray]] = {}

    @property
    def headline(self) -> str:
        """The head's headline metric (:data:`gfm_core.task_heads.HEADS`)."""
        return get_head(self.head).headline

    def _add(self, **stats: Tensor) -> None:
        for k, v in stats.items():
            self._rows.setdefault(k, []).append(v.detach().cpu().numpy())

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` from :meth:`gfm_core.objectives.Finetune.predict`, ``target`` the labels."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The torchmetrics values over everything added."""
        raise NotImplementedError

    def per_sample(self) -> Stats:
        """Per-sample statistics (module docstring), rows in the order the samples were added."""
        return {k: np.concatenate(v) for k, v in self._rows.items()}

    @staticmethod
    def from_stats(sel: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The metrics of the samples whose per-sample statistics are ``sel`` (equal to ``compute`` on them)."""
        raise NotImplementedError


#: Head name -> metric accumulator class (``@METRICS.register``; the names are the rows of ``HEADS``).
METRICS: HeadRegistry[type[TaskMetrics]] = HeadRegistry("metrics")


@METRICS.register
class ClassificationMetrics(TaskMetrics):
    """Top-1 accuracy; ``pred``: ``[B, K]`` scores, ``target``: ``[B]`` class ids."""

    head = "classification"

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=1)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; keep whether each sample's top-1 class is right (``correct``)."""
        self.acc.update(pred, target)
        self._add(correct=(pred.argmax(1) == target).to(torch.float64))

    def compute(self) -> dict[str, float]:
        """``{"acc"}``: top-1 accuracy in percent."""
        return {"acc": 100 * float(self.acc.compute())}

    @staticmethod
    def from_stats(sel: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Top-1 accuracy (percent) of the samples in ``sel``."""
        return {"acc": 100 * float(np.mean(sel["correct"]))}


@METRICS.register
class MultilabelMetrics(TaskMetrics):
    """Micro-averaged AP (paper's BigEarthNet metric); ``pred``: ``[B, L]`` probabilities, ``target``: 0/1."""

    head = "multilabel"

    def __init__(self, num_labels: int, ignore_index: int | None = None) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.ap = MultilabelAveragePrecision(num_labels=num_labels, average="micro")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; keep each sample's scores and 0/1 targets (AP does not split into per-sample parts)."""
        target = target.long()
        self.ap.update(pred, target)
        self._add(scores=pred.float(), targets=target)

    def compute(self) -> dict[str, float]:
        """``{"mAP"}``: micro-averaged AP in percent."""
        return {"mAP": 100 * float(self.ap.compute())}

    @staticmethod
    def from_stats(sel: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Micro-averaged AP (percent) of the samples in ``sel``."""
        ap = multilabel_average_precision(
            torch.from_numpy(np.ascontiguousarray(sel["scores"])),
            torch.from_numpy(np.ascontiguousarray(sel["targets"])),
            num_labels=sel["scores"].shape[1],
            average="micro",
        )
        return {"mAP": 100 * float(ap)}


@METRICS.register
class SegmentationMetrics(TaskMetrics):
    """mIoU and per-class IoU; ``pred``/``target``: ``[B, H, W]`` class ids (``ignore_index`` not scored)."""

    head = "segmentation"

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.miou = MulticlassJaccardIndex(
            num_classes=num_classes, average="macro", ignore_index=ignore_index
        )
        self.per_class = MulticlassJaccardIndex(
            num_classes=num_classes, average="none", ignore_index=ignore_index
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; keep each sample's confusion matrix (``confmat``)."""
        self.miou.update(pred, target)
        self.per_class.update(pred, target)
        self._add(confmat=confusion_matrices(pred, target, self.num_classes, self.ignore_index))

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "iou_<k>"}`` in percent; ``iou_<k>`` only for classes in the targets or predictions."""
        out = {"mIoU": 100 * float(self.miou.compute())}
        union = self.per_sample()["confmat"].sum(0)
        present = (union.sum(0) + union.sum(1)) > 0
        for k, v in enumerate(self.per_class.compute().tolist()):
            if present[k]:  # classes absent from targets and predictions have no IoU (and are left out)
                out[f"iou_{k}"] = 100 * float(v)
        return out

    @staticmethod
    def from_stats(sel: Mapping[str, np.ndarray]) -> dict[str, float]:
        """mIoU and per-class IoU (percent) from the summed confusion matrices in ``sel``."""
        cm = sel["confmat"].sum(0).astype(np.float64)
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = np.where(present, tp / np.where(present, union, 1), np.nan)
        out = {"mIoU": 100 * float(np.nanmean(iou)) if present.any() else 0.0}
        out.update({f"iou_{k}": 100 * float(v) for k, v in enumerate(iou) if present[k]})
        return out


def confusion_matrices(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """Per-sample confusion matrices ``[B, K, K]`` (row = target, column = prediction), int64."""
    b, k = pred.shape[0], num_classes
    t, p = target.reshape(b, -1).long(), pred.reshape(b, -1).long()
    keep = (t >= 0) & (t < k) if ignore_index is None else (t != ignore_index) & (t >= 0) & (t < k)
    if ((p < 0) | (p >= k)).any():
        raise ConfigError(f"segmentation predictions outside 0..{k - 1}")
    flat = torch.where(keep, t * k + p + (torch.arange(b, device=t.device) * k * k)[:, None], -1)
    counts = torch.bincount(flat[flat >= 0], minlength=b * k * k)
    return counts.view(b, k, k)


@METRICS.register
class ChangeMetrics(TaskMetrics):
    """Precision/recall/F1 of the change class; ``pred``/``target``: ``[B, H, W]`` in {0, 1}."""

    head = "change"

    def __init__(self, num_outputs: int = 2, ignore_index: int | None = None) -> None:
        super().__init__()
        self.p, self.r, self.f1 = BinaryPrecision(), BinaryRecall(), BinaryF1Score()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; keep each sample's change-pixel ``tp``, ``fp`` and ``fn`` counts."""
        for m in (self.p, self.r, self.f1):
            m.update(pred, target)
        b = pred.shape[0]
        p, t = pred.reshape(b, -1).bool(), target.reshape(b, -1).bool()
        self._add(tp=(p & t).sum(1), fp=(p & ~t).sum(1), fn=(~p & t).sum(1))

    def compute(self) -> dict[str, float]:
        """``{"precision", "recall", "F1"}`` of the change class, in percent."""
        return {
            "precision": 100 * float(self.p.compute()),
            "recall": 100 * float(self.r.compute()),
            "F1": 100 * float(self.f1.compute()),
        }

    @staticmethod
    def from_stats(sel: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Precision, recall and F1 (percent) from the summed pixel counts in ``sel`` (0 where undefined)."""
        tp, fp, fn = (float(np.sum(sel[k])) for k in ("tp", "fp", "fn"))
        return {
            "precision": 100 * _ratio(tp, tp + fp),
            "recall": 100 * _ratio(tp, tp + fn),
            "F1": 100 * _ratio(2 * tp, 2 * tp + fp + fn),
        }


@METRICS.register
class SuperResMetrics(TaskMetrics):
    """PSNR and SSIM per image (data range 1); ``pred``/``target``: ``[B, C, H, W]`` in [0, 1]."""

    head = "superres"

    def __init__(self, num_outputs: int = 3, ignore_index: int | None = None) -> None:
        super().__init__()
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; keep each image's ``psnr`` and ``ssim``."""
        pred, target = pred.float(), target.float()
        self.psnr.update(pred, target)
        self.ssim.update(pred, target)
        self._add(
            psnr=peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3), reduction="none"),
            ssim=cast(Tensor, structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")),
        )

    def compute(self) -> dict[str, float]:
        """``{"PSNR", "SSIM"}``: means over the images (PSNR in dB)."""
        return {"PSNR": float(self.psnr.compute()), "SSIM": float(cast(Tensor, self.ssim.compute()))}

    @staticmethod
    def from_stats(sel: Mapping[str, np.ndarray]) -> dict[str, float]:
        """``{"PSNR", "SSIM"}``: the means of the per-image values."""
        return {"PSNR": float(np.mean(sel["psnr"])), "SSIM": float(np.mean(sel["ssim"]))}


def build_metrics(head: str, num_outputs: int, ignore_index: int | None = 255) -> TaskMetrics:
    """The metric accumulator of a head.

    Raises:
        ConfigError: unknown head (the message lists the valid ones).
    """
    metrics: Callable[[int, int | None], TaskMetrics] = METRICS.get(head)  # subclasses take these two
    return metrics(num_outputs, ignore_index)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def metrics_from_stats(
    head: str, stats: Mapping[str, np.ndarray], rows: np.ndarray | None = None
) -> dict[str, float]:
    """Recompute a head's metrics from per-sample statistics, on ``rows`` (a resample; default all rows).

    Equal to :meth:`TaskMetrics.compute` on the same samples (tested), so a bootstrap over samples needs no
    second pass over the model.

    Raises:
        ConfigError: unknown head (the message lists the valid ones).
    """
    cls = METRICS.get(head)
    return cls.from_stats({k: (v if rows is None else v[rows]) for k, v in stats.items()})
