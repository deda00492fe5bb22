"""What the student reconstructs: a PNG grid of a few masked pile images, for the UIs (Dagster, MLflow).

One row per image: the input, the input with its masked patches greyed out, the decoder's prediction, and
the visible pixels with the prediction pasted into the masked ones (what SimMIM's L1 loss is taken on).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gfm_core.io import write_bytes

COLUMNS = ("input", "masked", "prediction", "visible + prediction")


def _to_rgb(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[B, C, H, W]`` normalised -> ``[B, H, W, 3]`` uint8 (first three bands; one band as grey)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1)
    img = img[:, :3] if img.shape[1] >= 3 else img[:, :1].expand(-1, 3, -1, -1)
    return (img.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(objective: torch.nn.Module, images: Tensor, masks: Tensor) -> np.ndarray:
    """The ``[B * H, 4 * W, 3]`` uint8 grid for ``images`` ``[B, C, H, W]`` (normalised) and token ``masks``.

    ``objective`` is a :class:`gfm_core.objectives.ContinualPretrain` (its ``reconstruct``, ``mean``, ``std``
    and ``student.patch_size``); it is run in eval mode and restored afterwards.
    """
    device = next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    try:
        x, mask = images.to(device), masks.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = objective.reconstruct(x, mask).float()
    finally:
        objective.train(was_training)
    p = objective.student.patch_size
    pix = mask.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1).unsqueeze(1).to(x.dtype)
    mean, std = objective.mean, objective.std
    grey = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std, strict=True)], device=device).view(1, -1, 1, 1)
    cols = [x, x * (1 - pix) + grey * pix, pred, x * (1 - pix) + pred * pix]
    rgb = [_to_rgb(c, mean, std) for c in cols]  # each [B, H, W, 3]
    rows = [np.concatenate([c[i] for c in rgb], axis=1) for i in range(x.shape[0])]
    return np.concatenate(rows, axis=0)


def save_reconstructions(objective: torch.nn.Module, samples: Sequence[dict[str, Tensor]], path: str | Path) -> Path:
    """Write :func:`reconstruction_grid` of pretraining ``samples`` (``{"image", "mask"}``) as a PNG (atomic)."""
    from PIL import Image

    images = torch.stack([s["image"] for s in samples])
    masks = torch.stack([torch.as_tensor(s["mask"]) for s in samples]).bool()
    grid = reconstruction_grid(objective, images, masks)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
