"""The task heads the pipeline knows, one row each: what a newcomer changes to add a head.

A row (:class:`HeadSpec`) holds the head's facts: the batch key of its target, its headline metric and report
columns, the folder layouts its tasks can be read from and the default folder names of the generic ``folders``
layout. The computation lives in the head's classes, registered under the same name:

- the head module (:mod:`gfm_core.models.heads`, ``@TASK_HEADS.register``): ``forward(features, image)``, its
  training ``loss(out, target)`` and metric-ready ``predict(out, target)``;
- the metric accumulator (:mod:`gfm_core.evaluation.metrics`, ``@METRICS.register``): torchmetrics values and
  the per-sample statistics its bootstrap resamples;
- the trivial predictor (:mod:`gfm_core.evaluation.trivial`, ``@TRIVIAL_PREDICTORS.register``), the report's
  row every model must beat;
- the sample reader (:mod:`gfm_core.data.tasks.samples`, ``@SAMPLE_READERS.register``): raw arrays of a sample,
  its label tensors, the head's number of outputs.

So adding a head is one row here plus its four classes; ``tests/core/test_task_heads.py`` checks that every row
has all four, and the head tests iterate over :data:`HEADS` the way timm's tests iterate ``list_models()``.
This module imports no torch: the config validates head names and layouts against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from gfm_core.errors import ConfigError

C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class HeadSpec:
    """What the pipeline knows about one task head (its classes hold the computation).

    Attributes:
        name: the head's name (``finetune.tasks[].head``).
        target: the batch key of the label the loss and metrics compare with.
        headline: the metric used for ARP and the bootstrap (a task may override it).
        columns: the metrics shown in the report's table, in order.
        layouts: the folder layouts a task of this head can be read from.
        dirs: the ``folders`` layout's default ``<split>/<dir>/`` names (images first, the label last).
        files: the sample's file keys read from those folders, in the same order.
    """

    name: str
    target: str
    headline: str
    columns: tuple[str, ...]
    layouts: tuple[str, ...]
    dirs: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


#: Every head, by name. Explicit on purpose (STYLE.md): an unknown name fails listing these keys.
HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("classification", "label", "acc", ("acc",), ("ucmerced", "resisc45", "eurosat", "geobench")),
        HeadSpec("multilabel", "label", "mAP", ("mAP",), ("bigearthnet", "geobench")),
        HeadSpec("segmentation", "mask", "mIoU", ("mIoU",), ("folders",), ("images", "masks"), ("image", "mask")),
        HeadSpec("change", "mask", "F1", ("precision", "recall", "F1"), ("levircd", "oscd", "folders"),
                 ("A", "B", "label"), ("A", "B", "label")),
        HeadSpec("superres", "target", "PSNR", ("PSNR", "SSIM"), ("folders",), ("lr", "hr"), ("lr", "hr")),
    )
}


def get_head(name: str) -> HeadSpec:
    """The row of head ``name``.

    Raises:
        ConfigError: unknown head (the message lists the valid names).
    """
    if name not in HEADS:
        raise ConfigError(f"unknown task head {name!r}; valid: {', '.join(sorted(HEADS))}")
    return HEADS[name]


class HeadRegistry(Generic[C]):
    """Classes of one kind keyed by head name; ``@registry.register`` files a class under its ``head`` attribute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what it holds, for messages: "head module", "metrics"
        self.classes: dict[str, C] = {}

    def register(self, cls: C) -> C:
        """Class decorator: file ``cls`` under ``cls.head`` (which must be a row of :data:`HEADS`)."""
        name = str(getattr(cls, "head", ""))
        get_head(name)
        if name in self.classes:
            raise ConfigError(f"{self.kind} of head {name!r} registered twice")
        self.classes[name] = cls
        return cls

    def get(self, name: str) -> C:
        """The class of head ``name``.

        Raises:
            ConfigError: unknown head, or a head without a class of this kind.
        """
        get_head(name)
        if name not in self.classes:
            raise ConfigError(f"head {name!r} has no {self.kind} class registered")
        return self.classes[name]
