"""Training objectives: ``forward(batch) -> {"loss", <parts>}`` modules that :func:`~gfm_core.training.loop.fit`
trains. :mod:`.pretrain`: GFM's teacher-student continual pretraining; :mod:`.finetune`: a backbone with a task
head."""

from gfm_core.objectives.finetune import Finetune
from gfm_core.objectives.pretrain import (
    STUDENT_FEATURE_STAGE,
    ContinualPretrain,
    build_continual_pretrain,
    export_backbone,
)

__all__ = ["STUDENT_FEATURE_STAGE", "ContinualPretrain", "Finetune", "build_continual_pretrain", "export_backbone"]
