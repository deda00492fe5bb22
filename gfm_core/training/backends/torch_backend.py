"""Plain PyTorch backend: one process, or DDP under ``torchrun``; autocast bf16/fp16, GradScaler for fp16."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import atomic_write
from gfm_core.training.backends.base import Distributed, Precision, check_precision, env_int, grads, total_norm
from gfm_core.training.backends.devices import lower_frozen_precision, move_to, resolve_device


class TorchBackend(Distributed):
    """Plain PyTorch: one process, or DDP under ``torchrun`` (``WORLD_SIZE > 1``).

    Args:
        device: ``"cpu"``, ``"cuda"`` (= ``cuda:$LOCAL_RANK``) or ``"cuda:N"``; never silently replaced.
        precision: ``"fp32"``; ``"bf16"`` = ``torch.autocast`` in bfloat16 (CPU or CUDA), fp32 weights;
            ``"fp16"`` = autocast float16 + ``GradScaler`` (CUDA only). Under autocast, frozen submodules
            that support it keep their weights in the autocast dtype (:func:`lower_frozen_precision`).
        find_unused_parameters: passed to DDP (set it when some trainable parameters get no gradient).
    """

    name = "torch"

    def __init__(
        self, device: str = "cpu", precision: Precision = "fp32", *, find_unused_parameters: bool = False
    ):
        self._device = resolve_device(device)
        check_precision(precision, self._device)
        self.precision = precision
        self._world = env_int("WORLD_SIZE", 1)
        self._rank = env_int("RANK", 0)
        self._find_unused = find_unused_parameters
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        if self._world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self._device.type == "cuda" else "gloo")
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self.grad_accum = 1
        self.clip_grad: float | None = None
        self._micro = 0

    @property
    def module(self) -> nn.Module:
        """The unwrapped objective (after :meth:`prepare`)."""
        if self._module is None:
            raise RuntimeError("TorchBackend.prepare() has not been called")
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer given to :meth:`prepare`."""
        if self._optimizer is None:
            raise RuntimeError("TorchBackend.prepare() has not been called")
        return self._optimizer

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_accum: int = 1,
        clip_grad: float | None = None,
    ) -> None:
        """Move ``model`` to the device in place (the optimizer keeps its parameters); wrap it in DDP."""
        if grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {grad_accum}")
        if self.precision != "fp32":
            lower_frozen_precision(model, torch.bfloat16 if self.precision == "bf16" else torch.float16)
        self._module = model.to(self._device)
        self._wrapped = self._module
        if self._world > 1:
            ids = [self._device.index] if self._device.type == "cuda" else None
            self._wrapped = nn.parallel.DistributedDataParallel(
                self._module, device_ids=ids, find_unused_parameters=self._find_unused
            )
        self._optimizer = optimizer
        self._scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.grad_accum, self.clip_grad, self._micro = grad_accum, clip_grad, 0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self._device.type, dtype=dtype)

    def forward(self, batch: Any) -> dict[str, Any]:
        """Move ``batch`` to the device and run the objective under autocast."""
        assert self._wrapped is not None, "prepare() first"
        if isinstance(self._wrapped, nn.parallel.DistributedDataParallel):
            # what DDP.no_sync() does: all-reduce gradients only in the last micro-batch's backward
            self._wrapped.require_backward_grad_sync = (self._micro + 1) % self.grad_accum == 0
        batch = move_to(batch, self._device)
        with self._autocast():
            return self._wrapped(batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss / grad_accum`` (scaled by the GradScaler in fp16)."""
        loss = loss / self.grad_accum
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> float | None:
        """At the accumulation boundary: unscale, clip, step, zero grad; return the pre-clip grad norm."""
        self._micro += 1
        if self._micro % self.grad_accum:
            return None
        opt = self.optimizer
        if self._scaler is not None:
            self._scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.clip_grad:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad))
        else:
            norm = total_norm(grads(opt))
        if self._scaler is not None:
            self._scaler.step(opt)  # skipped when the scaled grads overflowed
            self._scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The unwrapped objective's weights, on the CPU."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Rank 0 writes ``<directory>/<tag>.pt``: model, optimizer, scaler and ``client_state``."""
        if self.is_main:
            state: dict[str, Any] = {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "client_state": client_state,
            }
            if self._scaler is not None:
                state["scaler"] = self._scaler.state_dict()
            with atomic_write(Path(directory) / f"{tag}.pt") as f:
                torch.save(state, f)
        self.barrier()

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        """Restore model, optimizer and scaler from ``<directory>/<tag>.pt``; return ``client_state``."""
        path = Path(directory) / f"{tag}.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{path}: checkpoint file not found (was it written by the deepspeed backend?)"
            )
        try:
            state = torch.load(path, map_location=self._device, weights_only=True)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self._scaler is not None:
                if "scaler" not in state:
                    raise KeyError("scaler (the checkpoint was not written with precision fp16)")
                self._scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path}: cannot restore training state ({type(e).__name__}: {e})") from e
        self._micro = 0
        return dict(state.get("client_state", {}))
