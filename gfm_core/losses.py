"""GFM loss terms as pure functions (paper Eq. 2 and Eq. 3; total = w_mim * L_MIM + alpha * L_feat)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_l1(pred: Tensor, target: Tensor, mask_pixels: Tensor) -> Tensor:
    """Mean absolute error over masked pixels only (SimMIM; paper Eq. 2).

    ``sum(|pred - target| * mask) / (mask.sum() + 1e-5) / C``: the sum over masked pixel-channels divided by
    (number of masked pixels x channels).

    Args:
        pred: ``[B, C, H, W]`` reconstruction.
        target: ``[B, C, H, W]`` the (normalised) input image.
        mask_pixels: ``[B, 1, H, W]`` or ``[B, H, W]``, 1 = masked, at pixel resolution.

    Returns:
        Scalar float32 tensor (computed in float32 whatever the input dtype or autocast state).
    """
    if pred.shape != target.shape:
        raise ValueError(f"masked_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if mask_pixels.dim() == 3:
        mask_pixels = mask_pixels.unsqueeze(1)
    channels = pred.shape[1]
    with torch.autocast(device_type=pred.device.type, enabled=False):
        mask = mask_pixels.float()
        l1 = F.l1_loss(pred.float(), target.float(), reduction="none")
        return (l1 * mask).sum() / (mask.sum() + 1e-5) / channels


def neg_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Negative cosine similarity averaged over the batch, with the teacher detached (paper Eq. 3).

    Args:
        student: ``[B, D]`` projected student features (gradients flow).
        teacher: ``[B, D]`` teacher features (treated as constants).

    Returns:
        Scalar float32 tensor in [-1, 1]; -1 when the two are aligned (bf16 would quantise it to ~4e-3).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"neg_cosine: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ "
            f"(the projector must map to the teacher's feature dim)"
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        return -F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1).mean()


def gfm_loss(
    pred: Tensor,
    target: Tensor,
    mask_pixels: Tensor,
    student: Tensor,
    teacher: Tensor | None,
    *,
    w_mim: float = 1.0,
    alpha: float = 1.0,
) -> dict[str, Tensor]:
    """The GFM objective with its named parts.

    Args:
        pred: ``[B, C, H, W]`` reconstruction.
        target: ``[B, C, H, W]`` normalised input image.
        mask_pixels: ``[B, 1, H, W]`` or ``[B, H, W]``, 1 = masked.
        student: ``[B, D]`` projected student features.
        teacher: ``[B, D]`` teacher features, or ``None`` when the teacher was not run (``alpha == 0``). Then
            ``distill`` is an exact zero that still depends on ``student`` (zero gradients), so the projector
            stays in the autograd graph and DDP / ZeRO do not see unused parameters.
        w_mim: weight of the reconstruction loss (0 = distillation only).
        alpha: weight of the distillation loss (0 = MIM only).

    Returns:
        ``{"loss": w_mim * mim + alpha * distill, "mim": ..., "distill": ...}`` (scalar tensors; the parts are
        unweighted).
    """
    mim = masked_l1(pred, target, mask_pixels)
    distill = student.sum() * 0.0 if teacher is None else neg_cosine(student, teacher)
    return {"loss": w_mim * mim + alpha * distill, "mim": mim, "distill": distill}


def dice_loss(logits: Tensor, mask: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice of the change class; ``logits: [B, 2, H, W]``, ``mask: [B, H, W]`` in {0, 1}."""
    p = logits.float().softmax(1)[:, 1]
    t = mask.float()
    inter = (p * t).sum()
    return 1 - (2 * inter + eps) / (p.sum() + t.sum() + eps)
