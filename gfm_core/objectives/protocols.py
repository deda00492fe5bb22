"""Fine-tuning protocols (``finetune.protocol``): what trains.

- ``finetune``: backbone and head (the paper; :class:`~gfm_core.objectives.Finetune` as it stands).
- ``frozen``: the backbone's parameters have ``requires_grad=False`` and it stays in eval mode whatever
  ``train()`` is called with (so BatchNorm statistics, dropout and drop-path neither change nor act; the way
  :class:`gfm_core.models.backbones.FrozenTeacher` is kept); the task's own head trains with the same recipe
  (PANGAEA's frozen-encoder setting). Nothing upstream of the head then requires grad, so autograd records no
  graph through the backbone: it runs as under ``torch.no_grad()`` without saying so.
- ``linear``: ``frozen`` with the head reduced to pooled features -> one linear layer: the classification head
  (global average pool -> dropout -> linear) with its dropout removed. Dense heads have no linear probe.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gfm_core.config.downstream import LINEAR_PROBE_HEADS
from gfm_core.errors import ConfigError
from gfm_core.models.heads import TaskModel
from gfm_core.objectives.finetune import Finetune


class FrozenBackboneFinetune(Finetune):
    """:class:`Finetune` with the backbone frozen: no gradients, always in eval mode (module docstring)."""

    def __init__(self, model: TaskModel, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        model.backbone.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> FrozenBackboneFinetune:
        """Set the head's mode to ``mode``; the backbone stays in eval mode."""
        super().train(mode)
        self.model.backbone.train(False)
        return self


def linear_probe_(model: TaskModel) -> TaskModel:
    """Reduce ``model``'s head to pooled features -> one linear layer, in place (its dropout removed).

    Raises:
        ConfigError: the head is not a classification head, or has trainable layers beyond one linear layer.
    """
    head: Any = model.head
    if head.head not in LINEAR_PROBE_HEADS:
        raise ConfigError(
            f"task {model.task!r}: protocol linear is a linear probe for {'/'.join(LINEAR_PROBE_HEADS)} heads, "
            f"not {head.head!r}; use protocol frozen (the frozen backbone with the task's own head)"
        )
    if hasattr(head, "drop"):
        head.drop = nn.Identity()
    owners = {type(m).__name__ for m in head.modules() if any(True for _ in m.parameters(recurse=False))}
    if owners != {"Linear"} or sum(isinstance(m, nn.Linear) for m in head.modules()) != 1:
        raise ConfigError(
            f"task {model.task!r}: protocol linear needs a head of one linear layer on pooled features; "
            f"the {head.head} head has trainable {sorted(owners)} layers"
        )
    return model


def build_objective(model: TaskModel, protocol: str, **kwargs: Any) -> Finetune:
    """The fine-tuning objective of ``protocol`` (``finetune``, ``frozen`` or ``linear``) around ``model``.

    ``kwargs`` go to :class:`~gfm_core.objectives.Finetune`.

    Raises:
        ConfigError: an unknown protocol, or ``linear`` on a head that has no linear probe.
    """
    if protocol == "finetune":
        return Finetune(model, **kwargs)
    if protocol == "linear":
        linear_probe_(model)
    elif protocol != "frozen":
        raise ConfigError(f"finetune.protocol: unknown protocol {protocol!r}; valid: finetune, frozen, linear")
    return FrozenBackboneFinetune(model, **kwargs)
