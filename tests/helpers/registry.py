"""A tiny exported backbone for registry tests (MIM-only pretraining: no teacher file needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gfm_core.config import PretrainCfg, StudentCfg
from gfm_core.objectives import build_continual_pretrain, export_backbone

TINY = StudentCfg(arch="swin_tiny_patch4_window7_224", img_size=64, window_size=2, embed_dim=16,
                  depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def tiny_backbone(folder: Path, seed: int, meta: dict[str, Any] | None = None) -> tuple[Path, torch.nn.Module]:
    """Export a freshly initialised tiny student (``seed``) to ``folder/b<seed>/``; returns its path and objective."""
    torch.manual_seed(seed)
    obj = build_continual_pretrain(PretrainCfg(student=TINY, alpha=0.0))
    return export_backbone(obj, folder / f"b{seed}" / "backbone.safetensors", meta), obj
