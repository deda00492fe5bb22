"""Task heads over any timm backbone's multi-scale features, registered by name in ``TASK_HEADS``.

:class:`FeatureAdapter` is the one way features leave a backbone: timm's ``forward_intermediates`` (NCHW for
every model; timm's Swin permutes its NHWC stages itself) at the levels of ``feature_info`` with a stride of
at least 4 (Swin: 4/8/16/32; EfficientNet: 4/8/16/32, its stride-2 stem level is dropped). Unused tails (a
classifier, EfficientNet's ``conv_head``) are pruned so that every parameter left gets a gradient. Swin's
final LayerNorm is kept and applied to the last level (``norm=True``), as in its classifier path.

Heads (``forward(features, image) -> output``):

- ``classification`` / ``multilabel``: global average pool of the last level -> linear (logits ``[B, K]``).
- ``segmentation``: a decoder of :mod:`gfm_core.models.decoders` (``fpn`` or ``upernet``, fused at stride 4)
  -> 1x1 classifier, upsampled to the input size (``[B, K, H, W]``).
- ``change``: siamese: the shared backbone encodes both dates; per level ``|f_A - f_B|`` feeds the decoder
  -> 2-class logits ``[B, 2, H, W]``.
- ``superres``: FPN decoder -> 3x3 conv -> ``PixelShuffle(4)`` back to the input size, added to the (bicubic
  upsampled, normalised) input image: a residual ``[B, C, H, W]`` in normalised units.

Each head also owns its objective (``loss(out, target) -> {"loss", <parts>}``) and its metric-ready
``predict(out, target)``; :class:`gfm_core.objectives.Finetune` only routes the batch. The facts about a head
(target key, headline, layouts) are its row in :data:`gfm_core.task_heads.HEADS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.losses import dice_loss
from gfm_core.models.decoders import DECODERS, FPNDecoder, build_decoder
from gfm_core.task_heads import HeadRegistry


class FeatureAdapter(nn.Module):
    """Multi-scale NCHW features of a timm backbone via ``forward_intermediates`` (see the module docstring).

    Attributes:
        model: the (pruned) timm model.
        indices: the ``feature_info`` levels returned.
        channels, reductions: per returned level.
        in_chans: input channels the backbone takes.
    """

    def __init__(self, model: nn.Module, min_reduction: int = 4) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not info or not hasattr(model, "forward_intermediates"):
            raise ConfigError(
                f"{type(model).__name__} has no feature_info/forward_intermediates(); task heads need a timm "
                f"model with timm's intermediate-feature API"
            )
        info = [dict(f) for f in info]
        indices = [i for i, f in enumerate(info) if int(f["reduction"]) >= min_reduction]
        if not indices:
            raise ConfigError(f"{type(model).__name__}: no feature level with a stride >= {min_reduction}")
        if hasattr(model, "prune_intermediate_layers"):
            cast(Any, model).prune_intermediate_layers(indices, prune_norm=False, prune_head=True)
        self.model = model
        self.indices = indices
        self.channels = [int(info[i]["num_chs"]) for i in indices]
        self.reductions = [int(info[i]["reduction"]) for i in indices]
        self.in_chans = _in_chans(model)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x: [B, C, H, W]`` -> one ``[B, C_i, H / r_i, W / r_i]`` map per level (timm pads odd grids)."""
        feats = cast(Any, self.model).forward_intermediates(
            x, indices=self.indices, norm=True, stop_early=True, intermediates_only=True
        )
        return list(feats)


def _in_chans(model: nn.Module) -> int:
    value = getattr(model, "in_chans", None)
    if value is None:
        value = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    return int(value)


def dense(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Logits resized (bilinear) to a label's ``size``; unchanged when they already match it."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


class TaskHead(nn.Module):
    """Base of the heads: ``forward(features, image) -> output``; ``siamese`` heads get pairs of features.

    Subclasses name their row of :data:`gfm_core.task_heads.HEADS` in ``head`` and implement ``loss`` and
    ``predict`` on the output of ``forward``.
    """

    head = ""
    siamese = False

    def loss(self, out: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The training loss of ``out`` against ``target``: ``{"loss": scalar, <detached parts to log>}``."""
        raise NotImplementedError

    def predict(self, out: Tensor, target: Tensor) -> Tensor:
        """Metric-ready predictions of ``out`` (``target`` gives the label's size)."""
        raise NotImplementedError

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], num_outputs: int) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ConfigError(f"{type(self).__name__}: num_outputs must be >= 1, got {num_outputs}")
        self.channels, self.reductions, self.num_outputs = list(channels), list(reductions), num_outputs


#: Head name -> head module class (``@TASK_HEADS.register``; the names are the rows of ``HEADS``).
TASK_HEADS: HeadRegistry[type[TaskHead]] = HeadRegistry("head module")


@TASK_HEADS.register
class ClassificationHead(TaskHead):
    """Global average pool of the last level -> dropout -> linear: logits ``[B, num_outputs]``."""

    head = "classification"

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        num_outputs: int,
        *,
        dropout: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__(channels, reductions, num_outputs)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.channels[-1], num_outputs)

    def forward(self, feats: Sequence[Tensor], image: Tensor) -> Tensor:
        """Logits ``[B, num_outputs]`` from the last level."""
        return self.fc(self.drop(feats[-1].mean(dim=(2, 3))))

    def loss(self, out: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy on class ids ``[B]`` or soft targets ``[B, K]`` (Mixup, smoothing); accuracy to log."""
        hard = target.argmax(1) if target.is_floating_point() else target
        return {"loss": F.cross_entropy(out.float(), target), "acc": (out.argmax(1) == hard).float().mean().detach()}

    def predict(self, out: Tensor, target: Tensor) -> Tensor:
        """Class probabilities ``[B, K]``."""
        return out.float().softmax(1)


@TASK_HEADS.register
class MultilabelHead(ClassificationHead):
    """The classification head with independent labels: logits ``[B, L]``."""

    head = "multilabel"

    def loss(self, out: Tensor, target: Tensor) -> dict[str, Tensor]:
        """``MultiLabelSoftMarginLoss`` (as GFM's code); soft (mixed, smoothed) targets in [0, 1] work alike."""
        return {"loss": F.multilabel_soft_margin_loss(out.float(), target.float())}

    def predict(self, out: Tensor, target: Tensor) -> Tensor:
        """Label probabilities ``[B, L]``."""
        return out.float().sigmoid()


@TASK_HEADS.register
class SegmentationHead(TaskHead):
    """Decoder -> dropout -> 1x1 classifier, upsampled to the input size: ``[B, K, H, W]``.

    ``decoder``: ``fpn`` or ``upernet`` (:data:`gfm_core.models.decoders.DECODERS`), ``decoder_dim`` channels.
    ``ignore_index``: the mask value that is neither trained on nor scored.
    """

    head = "segmentation"

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        num_outputs: int,
        *,
        decoder_dim: int = 256,
        decoder: str = "fpn",
        dropout: float = 0.1,
        ignore_index: int = 255,
        **_: Any,
    ) -> None:
        super().__init__(channels, reductions, num_outputs)
        self.ignore_index = ignore_index
        self.decoder = build_decoder(decoder, self.channels, decoder_dim)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(decoder_dim, num_outputs, 1)

    def forward(self, feats: Sequence[Tensor], image: Tensor) -> Tensor:
        """Logits ``[B, K, H, W]`` at ``image``'s size."""
        logits = self.classifier(self.drop(self.decoder(feats)))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, out: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy over the labelled pixels, logits resized to the mask."""
        return {"loss": F.cross_entropy(dense(out, target.shape[-2:]), target, ignore_index=self.ignore_index)}

    def predict(self, out: Tensor, target: Tensor) -> Tensor:
        """Class maps ``[B, H, W]`` at the mask's size."""
        return dense(out, target.shape[-2:]).argmax(1)


@TASK_HEADS.register
class ChangeHead(SegmentationHead):
    """Siamese change detection: per level ``|f_A - f_B|`` -> decoder -> 2-class logits ``[B, 2, H, W]``."""

    head = "change"
    siamese = True

    def __init__(
        self, channels: Sequence[int], reductions: Sequence[int], num_outputs: int = 2, **kw: Any
    ) -> None:
        if num_outputs != 2:
            raise ConfigError(f"change head: num_outputs must be 2 (no change, change), got {num_outputs}")
        super().__init__(channels, reductions, num_outputs, **kw)

    def forward(self, feats: Sequence[Tensor], image: Tensor) -> Tensor:
        """``feats``: per level ``[B, 2, C, h, w]`` (both dates); ``image``: ``[B, 2, C, H, W]``."""
        diffs = [(f[:, 0] - f[:, 1]).abs() for f in feats]
        return super().forward(diffs, image[:, 0])

    def loss(self, out: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy + Dice of the change class (every pixel is labelled)."""
        logits = dense(out, target.shape[-2:])
        ce, dice = F.cross_entropy(logits, target), dice_loss(logits, target)
        return {"loss": ce + dice, "ce": ce.detach(), "dice": dice.detach()}


@TASK_HEADS.register
class SuperResHead(TaskHead):
    """FPN decoder -> 3x3 conv -> PixelShuffle(stride) -> + input image: ``[B, C, H, W]``, normalised.

    ``mean``/``std``: the image normalisation, to score predictions in [0, 1] units against the HR target.
    """

    head = "superres"
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        num_outputs: int,
        *,
        decoder_dim: int = 256,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        **_: Any,
    ) -> None:
        super().__init__(channels, reductions, num_outputs)
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)
        self.stride = self.reductions[0]
        self.decoder = FPNDecoder(self.channels, decoder_dim)
        self.to_pixels = nn.Conv2d(decoder_dim, num_outputs * self.stride**2, 3, padding=1)
        nn.init.zeros_(self.to_pixels.weight)  # start as the identity (the upsampled input)
        assert self.to_pixels.bias is not None  # nn.Conv2d(bias=True)
        nn.init.zeros_(self.to_pixels.bias)
        self.shuffle = nn.PixelShuffle(self.stride)

    def forward(self, feats: Sequence[Tensor], image: Tensor) -> Tensor:
        """``image`` plus the predicted residual: ``[B, C, H, W]``, normalised.

        Raises:
            ConfigError: ``image`` has a different number of bands than the head predicts.
        """
        if image.shape[1] != self.num_outputs:
            raise ConfigError(
                f"superres head predicts {self.num_outputs} bands but the input has {image.shape[1]}"
            )
        residual = self.shuffle(self.to_pixels(self.decoder(feats)))
        if residual.shape[-2:] != image.shape[-2:]:
            residual = F.interpolate(residual, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return image + residual

    def pixels(self, out: Tensor, size: Sequence[int]) -> Tensor:
        """Output (normalised) -> [0, 1] units at ``size`` (antialiased when shrinking)."""
        img = out.float() * self.std + self.mean
        if tuple(img.shape[-2:]) != tuple(size):
            shrink = size[0] < img.shape[-2]
            img = F.interpolate(img, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
        return img

    def loss(self, out: Tensor, target: Tensor) -> dict[str, Tensor]:
        """L1 in [0, 1] units against the HR target."""
        l1 = (self.pixels(out, target.shape[-2:]) - target.float()).abs().mean()
        return {"loss": l1, "l1": l1.detach()}

    def predict(self, out: Tensor, target: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] at the target's size."""
        return self.pixels(out, target.shape[-2:]).clamp(0, 1)


def head_class(task: str) -> type[TaskHead]:
    """The head module class of ``task``.

    Raises:
        ConfigError: unknown head (the message lists the valid names).
    """
    return TASK_HEADS.get(task)


class TaskModel(nn.Module):
    """Backbone (through :class:`FeatureAdapter`) + task head; ``forward(image) -> head output``.

    Change detection (a ``siamese`` head) takes ``image: [B, 2, C, H, W]``: both dates go through the same
    backbone in one batch of ``2B`` (shared weights).
    """

    def __init__(self, backbone: FeatureAdapter, head: TaskHead, task: str) -> None:
        super().__init__()
        self.backbone, self.head, self.task = backbone, head, task

    def forward(self, image: Tensor) -> Tensor:
        """The head's output for ``image: [B, C, H, W]`` (a pair ``[B, 2, C, H, W]`` for a siamese head).

        Raises:
            DataValidationError: ``image`` has the wrong rank, or not the backbone's number of bands.
        """
        c = self.backbone.in_chans
        if self.head.siamese:
            if image.dim() != 5 or image.shape[1] != 2:
                raise DataValidationError(
                    f"{self.task}: expected an image pair [B, 2, C, H, W], got {tuple(image.shape)}; change "
                    f"samples stack the two dates in dim 1 (torchgeo's layout)"
                )
            b = image.shape[0]
            if image.shape[2] != c:
                raise DataValidationError(
                    f"{self.task}: image pairs have {image.shape[2]} bands, the backbone {c}"
                )
            feats = self.backbone(image.flatten(0, 1))
            pairs = [f.view(b, 2, *f.shape[1:]) for f in feats]
            return self.head(pairs, image)
        if image.dim() != 4 or image.shape[1] != c:
            raise DataValidationError(
                f"{self.task}: expected an image [B, {c}, H, W] for this backbone, got {tuple(image.shape)}"
            )
        return self.head(self.backbone(image), image)


def build_task_model(
    task: str,
    backbone: nn.Module,
    *,
    num_outputs: int,
    decoder_dim: int = 256,
    decoder: str = "fpn",
    **head_kwargs: Any,
) -> TaskModel:
    """Wrap ``backbone`` (a timm model) in the adapter and attach a new ``TASK_HEADS[task]`` head.

    ``decoder`` (``fpn`` | ``upernet``) is the segmentation and change heads' decoder; the super-resolution head
    keeps its FPN, the classification heads have none.

    Raises:
        ConfigError: unknown task or decoder, or a backbone without timm's intermediate-feature API.
    """
    cls: Callable[..., TaskHead] = head_class(task)  # every registered head takes the head kwargs
    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    adapter = backbone if isinstance(backbone, FeatureAdapter) else FeatureAdapter(backbone)
    head = cls(
        adapter.channels, adapter.reductions, num_outputs, decoder_dim=decoder_dim, decoder=decoder, **head_kwargs
    )
    return TaskModel(adapter, head, task)
