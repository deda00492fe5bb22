"""What the student reconstructs: PNG grids of masked views for the UIs (Dagster, MLflow, DVC plots).

:meth:`gfm_core.evaluation.holdout.HoldoutProbe.save_reconstructions` lays out one row per held-out view: the
input, the input with its masked patches greyed out, the decoder's prediction at the start and at the end of
training, and the visible pixels with the final prediction pasted into the masked ones (what SimMIM's L1 loss
is taken on).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gfm_core.io import write_bytes


def to_rgb(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[B, C, H, W]`` normalised -> ``[B, H, W, 3]`` uint8 (first three bands; one band as grey)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1)
    img = img[:, :3] if img.shape[1] >= 3 else img[:, :1].expand(-1, 3, -1, -1)
    return (img.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def save_grid(columns: Sequence[Tensor], mean: Sequence[float], std: Sequence[float], path: str | Path) -> Path:
    """Write ``columns`` (each ``[B, C, H, W]`` normalised) side by side, one row per image, as a PNG."""
    from PIL import Image

    rgb = [to_rgb(c, mean, std) for c in columns]
    grid = np.concatenate([np.concatenate([c[i] for c in rgb], axis=1) for i in range(len(rgb[0]))], axis=0)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
