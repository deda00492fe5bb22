"""The fine-tuning objective: a backbone with a task head, ``forward(batch) -> {"loss", <parts>}``.

The head owns its loss and predictions (:mod:`gfm_core.models.heads`); the objective routes the batch: the
image through backbone and head, the target named by the head's row of :data:`gfm_core.task_heads.HEADS`
into the head's ``loss`` (training, :func:`gfm_core.training.loop.fit`'s contract) or ``predict`` (testing).
In training mode a ``mix`` (:class:`~gfm_core.objectives.mixing.BatchMix`: Mixup/CutMix, label smoothing)
turns the image and target into a mixed image and soft targets first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gfm_core.models.heads import TaskModel
from gfm_core.objectives.mixing import BatchMix
from gfm_core.task_heads import get_head


class Finetune(nn.Module):
    """The fine-tuning objective of one task (see the module docstring).

    Args:
        model: backbone + head (:func:`gfm_core.models.heads.build_task_model`).
        mix: training batches' Mixup/CutMix and label smoothing (:func:`~gfm_core.objectives.mixing.batch_mix`);
            ``None`` = the plain targets.
    """

    def __init__(self, model: TaskModel, mix: BatchMix | None = None) -> None:
        super().__init__()
        self.model = model
        self.mix = mix
        self.head = model.head.head
        self.target = get_head(self.head).target

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The head's ``{"loss", <parts>}`` on ``batch["image"]`` against the task's target (mixed in training)."""
        image, target = batch["image"], batch[self.target]
        if self.mix is not None and self.training:
            image, target = self.mix(image, target)
        return self.model.head.loss(self.model(image), target)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Tensor:
        """Metric-ready predictions: probabilities, class maps at the label's size, or images in [0, 1]."""
        return self.model.head.predict(self.model(batch["image"]), batch[self.target])
