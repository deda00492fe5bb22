"""AdamW parameter groups: weight decay split (paper section 2.2) and optional layer-wise lr scales.

Each group is a plain dict that ``torch.optim.AdamW`` (and DeepSpeed, which wraps it) accepts as it stands:
``{"params", "weight_decay", "lr_scale", "group_name"}``. The training loop sets
``group["lr"] = lr * lr_scale`` on every step, so the schedule and layer-wise decay compose without a
scheduler object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

from gfm_core.errors import ConfigError

#: Parameter-name substrings that never get weight decay (SimMIM/GFM ``optimizer.py`` skip list and keywords).
NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "mask_token",
    "relative_position_bias_table",
    "absolute_pos_embed",
    "pos_embed",
    "cls_token",
)


def is_no_decay(name: str, param: torch.Tensor, extra_no_decay: Iterable[str] = NO_DECAY_KEYWORDS) -> bool:
    """True for 1-D parameters (norms, scalars), biases and names containing one of ``extra_no_decay``."""
    return (
        param.ndim <= 1 or name.endswith(".bias") or name == "bias" or any(k in name for k in extra_no_decay)
    )


def param_groups(
    module: nn.Module,
    weight_decay: float,
    extra_no_decay: Sequence[str] = NO_DECAY_KEYWORDS,
    lr_scale_fn: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into AdamW groups by (decay, lr scale).

    Frozen parameters (``requires_grad=False``, e.g. the teacher) are left out. Groups keep the order in which
    their first parameter appears in ``module.named_parameters()``, so the grouping is deterministic.

    Args:
        module: the objective (model + heads); names are its ``named_parameters()`` names.
        weight_decay: decay of the decayed group (paper: 0.05).
        extra_no_decay: name substrings excluded from decay on top of 1-D params and biases.
        lr_scale_fn: ``name -> multiplier`` of the base lr (layer-wise lr decay); ``None`` = 1.0 for all.

    Returns:
        ``[{"params": [...], "weight_decay": float, "lr_scale": float, "group_name": str}, ...]``

    Raises:
        ValueError: ``weight_decay < 0``, a non-positive lr scale, or no trainable parameter at all.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = not is_no_decay(name, p, extra_no_decay)
        scale = 1.0 if lr_scale_fn is None else float(lr_scale_fn(name))
        if not scale > 0:
            raise ValueError(f"lr_scale_fn({name!r}) returned {scale}; lr scales must be > 0")
        key = (decay, scale)
        if key not in groups:
            label = ("decay" if decay else "no_decay") + ("" if scale == 1.0 else f"_x{scale:.6g}")
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "group_name": label,
            }
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters (all requires_grad=False); "
            f"nothing to optimize"
        )
    return list(groups.values())


def build_optimizer(
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **kwargs: Any,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups``, each group's lr set to ``lr * lr_scale``.

    A torch optimizer (not DeepSpeed's FusedAdam/CPUAdam) is used on purpose: DeepSpeed accepts it at every
    ZeRO stage and it needs no JIT-compiled op. Extra ``kwargs`` go to AdamW (e.g. ``foreach=``, ``fused=``).
    """
    if not groups:
        raise ValueError("build_optimizer needs at least one parameter group")
    prepared = []
    for g in groups:
        g = dict(g)
        g.setdefault("lr_scale", 1.0)
        g["lr"] = lr * g["lr_scale"]
        prepared.append(g)
    return torch.optim.AdamW(prepared, lr=lr, betas=betas, eps=eps, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group["lr_scale"]`` (1.0 when a group has no scale)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def layer_decay_fn(task_model: nn.Module, decay: float, prefix: str = "model.") -> Callable[[str], float]:
    """``name -> lr scale`` of layer-wise lr decay: ``decay ** (last_id - id)``; the task head gets 1.

    Names are the objective's (``<prefix>backbone.model.<timm name>``); parameters outside the backbone (the
    head) get 1.

    - timm's Swin (the paper's backbone): the paper's rule (GFM/SimMIM ``optimizer.py``, :func:`swin_layer_ids`):
      final norm 1, last block ``decay``, patch embedding ``decay ** (sum(depths) + 1)``.
    - Other timm models (CNNs): timm's ``param_groups_layer_decay`` on the full model: ids from the model's
      ``group_matcher(coarse=False)``, the classifier (pruned here, replaced by our head) is the last id with
      scale 1, so the last backbone group gets ``decay`` and group ``v`` of ``n`` gets ``decay ** (n - v)``.

    Raises:
        ConfigError: ``decay < 1`` on a non-Swin model without ``group_matcher()``.
    """
    backbone = cast(Any, task_model).backbone.model  # a TaskModel's timm model (any timm class)
    if decay == 1.0:
        return lambda name: 1.0
    if _is_swin(backbone):
        ids, last = swin_layer_ids(backbone)
    else:
        ids, last = _timm_layer_ids(backbone)
    scales = {f"{prefix}backbone.model.{k}": decay ** (last - v) for k, v in ids.items()}
    return lambda name: scales.get(name, 1.0)


def _is_swin(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def swin_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The paper's layer ids of a timm Swin's parameters, and the last id (``sum(depths) + 1``).

    SimMIM/GFM ``get_swin_layer``: patch embedding (and a mask token) 0; block ``j`` (counted over all
    stages) ``j + 1``; a stage's patch merging the id of the block before it (SimMIM ends stage ``i`` with
    it, timm starts stage ``i + 1`` with it: ``layers.{i+1}.downsample``); everything else (final norm,
    head) the last id.
    """
    depths = [len(cast(Any, stage).blocks) for stage in cast(Any, model).layers]
    last = sum(depths) + 1
    ids: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] in ("patch_embed", "mask_token"):
            ids[name] = 0
        elif parts[0] == "layers" and parts[2] == "blocks":
            ids[name] = sum(depths[: int(parts[1])]) + int(parts[3]) + 1
        elif parts[0] == "layers" and parts[2] == "downsample":
            ids[name] = sum(depths[: int(parts[1])])
        else:
            ids[name] = last
    return ids, last


def _timm_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """timm's ``group_matcher`` ids of ``model`` and the classifier's id (one past the last group)."""
    from timm.optim._param_groups import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ConfigError(
            f"{type(model).__name__} has no group_matcher(): layer-wise lr decay needs timm's layer grouping "
            f"(set finetune.layer_decay: 1.0 to switch it off)"
        )
    ids = group_parameters(model, cast(Any, model).group_matcher(coarse=False), reverse=True)
    return ids, max(ids.values()) + 1
