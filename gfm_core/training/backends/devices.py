"""Devices and batches: pick and check the device, move (nested) batches, lower frozen weights' precision."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gfm_core.errors import ConfigError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``MASTER_PORT`` of single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def move_to(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``; cast floating tensors if asked."""
    if isinstance(batch, torch.Tensor):
        non_blocking = device.type == "cuda"
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=non_blocking)
        return batch.to(device=device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device, float_dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, float_dtype) for v in batch)
    return batch


def auto_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"`` (logged, never silent); others unchanged."""
    if device != "auto":
        return device
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("device auto -> %s", chosen)
    return chosen


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` or ``"cuda"``/``"cuda:N"`` -> ``torch.device``; plain ``"cuda"`` means ``cuda:$LOCAL_RANK``.

    Raises:
        ConfigError: an unknown device, or CUDA requested while ``torch.cuda.is_available()`` is False.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but torch.cuda.is_available() is False "
                f"(no GPU visible or a CPU-only torch build); set device: cpu to train on the CPU"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N'")


def lower_frozen_precision(model: nn.Module, dtype: torch.dtype) -> int:
    """Let frozen submodules keep their weights in the autocast ``dtype`` the model will train under.

    Every submodule with a ``lower_precision_(dtype)`` method is called (duck-typed; e.g.
    :meth:`gfm_core.models.backbones.FrozenTeacher.lower_precision_`, which gives bit-identical outputs under
    autocast without re-casting its weights on every step). Returns how many were called.
    """
    lowered = 0
    for module in model.modules():
        hook = getattr(module, "lower_precision_", None)
        if callable(hook):
            hook(dtype)
            lowered += 1
    return lowered
