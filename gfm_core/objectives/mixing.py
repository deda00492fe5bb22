"""Mixup, CutMix and label smoothing of classification and multi-label training batches (timm's ``Mixup``).

The paper's recipe (GFM ``config.py``: ``AUG.MIXUP 0.8``, ``AUG.CUTMIX 1.0``, ``MODEL.LABEL_SMOOTHING 0.1``,
``MIXUP_PROB 1.0``, ``MIXUP_SWITCH_PROB 0.5``, ``MIXUP_MODE batch``): per batch, with probability 0.5 CutMix
(a box of the batch reversed pasted in) else Mixup (a blend with the batch reversed), the targets mixed with
the same weight.

- classification: class ids -> soft targets ``[B, K]``, smoothed ``y (1 - s) + s / K`` (timm's
  ``mixup_target``), trained with soft-target cross-entropy.
- multilabel: GFM's own ``data/mixup.py`` mixes the multi-hot targets with the same weight and smooths them
  the classification way, ``y (1 - s) + s / K`` with ``K`` the number of labels (timm's ``multi_label`` mode
  smooths towards 0.5 instead, so the smoothing is applied here, after timm mixes unsmoothed targets).
  Here ``label_smoothing`` also applies with Mixup and CutMix off (GFM then uses no smoothing for
  BigEarthNet; it only smooths inside its Mixup).

timm mixes a batch with itself reversed and needs an even batch: an odd batch's last sample is left unmixed
(only smoothed). Dense heads are never mixed (:func:`batch_mix` returns ``None`` for them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gfm_core.errors import ConfigError

if TYPE_CHECKING:
    from gfm_core.config import FinetuneCfg

#: Heads whose training batches are mixed and smoothed.
MIX_HEADS: tuple[str, ...] = ("classification", "multilabel")


class BatchMix:
    """``(image [B, C, H, W], target) -> (mixed image, soft target [B, K] float32)`` (module docstring).

    Args:
        head: ``classification`` (targets: class ids ``[B]``) or ``multilabel`` (multi-hot ``[B, K]``).
        num_classes: ``K``.
        mixup, cutmix: the Beta distributions' alpha; 0 = off.
        label_smoothing: ``s``.

    Raises:
        ConfigError: another head, or negative settings.
    """

    def __init__(self, head: str, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        from timm.data import Mixup

        if head not in MIX_HEADS:
            raise ConfigError(f"Mixup/CutMix/label smoothing apply to the {' and '.join(MIX_HEADS)} heads, "
                              f"not {head!r}")
        if min(mixup, cutmix) < 0 or not 0 <= label_smoothing < 1:
            raise ConfigError(f"mixup {mixup}, cutmix {cutmix} must be >= 0 and label_smoothing "
                              f"{label_smoothing} in [0, 1)")
        self.multilabel, self.num_classes, self.smoothing = head == "multilabel", num_classes, label_smoothing
        self.mixer = None
        if mixup > 0 or cutmix > 0:  # the paper's prob / switch_prob / mode are timm's defaults
            self.mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                               label_smoothing=0.0 if self.multilabel else label_smoothing,
                               num_classes=num_classes, multi_label=self.multilabel)

    def __call__(self, image: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The mixed batch and its soft targets; ``image`` is not modified."""
        n = len(image) - len(image) % 2
        if self.mixer is None or n == 0:
            return image, self._soft(target)
        mixed, soft = self.mixer(image[:n].clone(), target[:n])  # timm mixes in place
        soft = self._smooth(soft.float()) if self.multilabel else soft.float()
        if n < len(image):
            mixed, soft = torch.cat([mixed, image[n:]]), torch.cat([soft, self._soft(target[n:])])
        return mixed, soft

    def _soft(self, target: Tensor) -> Tensor:
        """Unmixed soft targets: smoothed one-hot (classification) or smoothed multi-hot."""
        from timm.data.mixup import mixup_target

        if self.multilabel:
            return self._smooth(target.float())
        return mixup_target(target, self.num_classes, lam=1.0, smoothing=self.smoothing).float()

    def _smooth(self, target: Tensor) -> Tensor:
        return target * (1 - self.smoothing) + self.smoothing / self.num_classes


def batch_mix(cfg: FinetuneCfg, head: str, num_classes: int) -> BatchMix | None:
    """The batch mixing of ``cfg`` (``mixup``, ``cutmix``, ``label_smoothing``) for ``head``.

    ``None`` for the dense heads (they ignore the settings) and when all three are 0.
    """
    if head not in MIX_HEADS or not (cfg.mixup or cfg.cutmix or cfg.label_smoothing):
        return None
    return BatchMix(head, num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, label_smoothing=cfg.label_smoothing)
