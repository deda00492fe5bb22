"""The :class:`Backend` protocol and what both backends share: precision check, rank bookkeeping, grad norms."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from gfm_core.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What :func:`gfm_core.training.loop.fit` needs from an execution backend."""

    name: str
    precision: str

    @property
    def rank(self) -> int:
        """Global rank of this process."""
        ...

    @property
    def world_size(self) -> int:
        """Number of processes (1 without ``torchrun``)."""
        ...

    @property
    def device(self) -> torch.device:
        """The device this rank trains on."""
        ...

    @property
    def is_main(self) -> bool:
        """Rank 0: writes files, calls callbacks."""
        ...

    @property
    def module(self) -> nn.Module:
        """The unwrapped objective."""
        ...

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose ``param_groups`` carry the lr."""
        ...

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_accum: int = 1,
        clip_grad: float | None = None,
    ) -> None:
        """Take ``model`` and ``optimizer`` onto the device (and wrap them); call once before training."""
        ...

    def forward(self, batch: Any) -> dict[str, Any]:
        """Move ``batch`` to the device and return the objective's ``{"loss", <parts>}``."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` of one micro-batch (scaled for gradient accumulation)."""
        ...

    def step(self) -> float | None:
        """Step the optimizer on the accumulation boundary; return the grad norm there, else ``None``."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The objective's full weights, on the CPU."""
        ...

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Write the training state (weights, optimizer, ``client_state``) under ``directory`` as ``tag``."""
        ...

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote as ``tag``; return its ``client_state``."""
        ...

    def barrier(self) -> None:
        """Wait for every rank."""
        ...

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over ranks, on the CPU."""
        ...


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`~gfm_core.errors.ConfigError` for an unknown precision, or fp16 off CUDA."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on the CPU")


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512 or AMX). Without them (an AVX2-only CPU) bf16
    autocast is emulated: measured 9x slower than fp32 for an EfficientNet forward, 66x for a matmul."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a non-oneDNN build: go by the ISA torch dispatches to
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def effective_precision(precision: str, device: str | torch.device) -> str:
    """``precision`` as it should run on ``device``: bf16 on a CPU without bf16 kernels runs in fp32 (a warning
    says so; ``GFM_FORCE_BF16=1`` keeps bf16 anyway, e.g. to test the bf16 path on such a machine)."""
    if (precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_fast_bf16()
            and os.environ.get("GFM_FORCE_BF16") != "1"):
        log.warning("precision bf16: this CPU (%s) has no bf16 kernels, where bf16 autocast runs many times slower "
                    "than fp32; training in fp32 (set GFM_FORCE_BF16=1 to keep bf16)",
                    torch.backends.cpu.get_cpu_capability())
        return "fp32"
    return precision


def env_int(name: str, default: int) -> int:
    """The integer environment variable ``name``; ``default`` when unset or empty."""
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients of the optimizer's parameters that have one."""
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def total_norm(tensors: list[torch.Tensor]) -> float:
    """Global L2 norm of ``tensors`` (0 when there are none)."""
    if not tensors:
        return 0.0
    return float(torch.nn.utils.get_total_norm(tensors, norm_type=2.0))


class Distributed:
    """Rank bookkeeping and the two collectives the loop uses; shared by both backends."""

    _rank: int
    _world: int
    _device: torch.device

    @property
    def rank(self) -> int:
        """Global rank of this process (``RANK``)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of processes (``WORLD_SIZE``)."""
        return self._world

    @property
    def device(self) -> torch.device:
        """The device this rank trains on."""
        return self._device

    @property
    def is_main(self) -> bool:
        """Rank 0: writes files, calls callbacks."""
        return self._rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self._world > 1:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over ranks, returned on the CPU (identity in a single process)."""
        if self._world == 1:
            return tensor
        t = tensor.to(self._device, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self._world).cpu()
