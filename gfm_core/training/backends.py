"""Execution backends behind one interface: plain torch (optionally DDP) and DeepSpeed.

The loop in :mod:`gfm_core.training.loop` only talks to a :class:`Backend`. Per micro-batch it calls
``forward(batch) -> dict``, ``backward(loss)`` and ``step()``; ``step()`` applies the update (clip, optimizer
step, zero grad) on the gradient-accumulation boundary and returns the gradient norm there, ``None``
elsewhere. This is DeepSpeed's own calling convention, so ``DeepSpeedBackend`` maps onto the engine one to
one.

Devices are explicit: ``device="cuda"`` without a visible GPU raises :class:`~gfm_core.errors.ConfigError`, it
never falls back to the CPU.

Multi-process runs are started by a launcher (``torchrun`` or ``deepspeed``), which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``TorchBackend`` wraps the model in DDP
when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA). ``DeepSpeedBackend`` always initialises a process group
(DeepSpeed needs one even for a single process) and fills in single-process values for whatever the launcher
did not set, with a free port.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import atomic_write

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
_PRECISIONS = ("fp32", "bf16", "fp16")
_REPO = Path(__file__).resolve().parents[2]


class Backend(Protocol):
    """What :func:`gfm_core.training.loop.fit` needs from an execution backend."""

    name: str
    precision: str

    @property
    def rank(self) -> int: ...  # global rank of this process
    @property
    def world_size(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def is_main(self) -> bool: ...  # rank 0: writes files, calls callbacks
    @property
    def module(self) -> nn.Module: ...  # the unwrapped objective
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...  # the torch optimizer whose param_groups carry the lr

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_accum: int = 1,
        clip_grad: float | None = None,
    ) -> None: ...
    def forward(self, batch: Any) -> dict[str, Any]: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> float | None: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None: ...
    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]: ...
    def barrier(self) -> None: ...
    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------- helpers


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


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in _PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(_PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on the CPU")


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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _total_norm(grads: list[torch.Tensor]) -> float:
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


class _Distributed:
    """Rank bookkeeping and the two collectives the loop uses; shared by both backends."""

    _rank: int
    _world: int
    _device: torch.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_main(self) -> bool:
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


# ----------------------------------------------------------------------------------------------- torch


class TorchBackend(_Distributed):
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
        _check_precision(precision, self._device)
        self.precision = precision
        self._world = _env_int("WORLD_SIZE", 1)
        self._rank = _env_int("RANK", 0)
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
        if self._module is None:
            raise RuntimeError("TorchBackend.prepare() has not been called")
        return self._module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
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
            norm = _total_norm(_grads(opt))
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


# ----------------------------------------------------------------------------------------------- deepspeed


def deepspeed_env(device_type: str) -> None:
    """Environment DeepSpeed needs before it is imported; launcher-set values are kept (``setdefault``).

    - ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``: single-process values and a free
      port (without them DeepSpeed tries MPI discovery and fails on ``mpi4py``).
    - ``DS_ACCELERATOR``: ``cpu`` or ``cuda``, matching ``device_type`` (read once, when deepspeed is
      imported).
    - ``TORCH_EXTENSIONS_DIR``: ``<repo>/.cache/torch_extensions``, so the shm op's JIT build (~27 s) is
      cached.

    Raises:
        ConfigError: ``DS_ACCELERATOR`` is already set to another accelerator.
    """
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(free_port())
    accel = os.environ.setdefault("DS_ACCELERATOR", device_type)
    if accel != device_type:
        raise ConfigError(
            f"DS_ACCELERATOR={accel!r} but device {device_type!r} was requested; "
            f"unset DS_ACCELERATOR or make them agree"
        )
    root = _REPO if (_REPO / "pyproject.toml").is_file() else Path.cwd()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".cache" / "torch_extensions"))


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's own state classes in its checkpoint files (ZeRO 0-3, fp32/bf16/fp16): plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | Path, map_location: Any = None) -> Any:
    """One file of a DeepSpeed checkpoint through ``torch.load(weights_only=True)``: tensors, containers and
    DeepSpeed's state classes only, so a planted pickle cannot run code.

    Raises:
        CheckpointError: the file is missing, corrupt, or holds anything else (a foreign or malicious pickle).
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError, AttributeError) as e:
        # torch's own reason, without its boilerplate (which suggests weights_only=False)
        parts = [p.strip() for p in str(e).split("\n\n") if p.strip()]
        told = [p for p in parts if not p.startswith(("Weights only load failed", "Check the documentation"))]
        reason = f"{type(e).__name__}: {(told or parts or [''])[0][:300]}"
        raise CheckpointError(
            f"{path}: refused to load this DeepSpeed checkpoint file ({reason}); only tensors and DeepSpeed's "
            f"own state are accepted (weights_only=True), so code in a pickle never runs. If the file is not "
            f"from this pipeline, move its checkpoint directory away or start fresh (resume: false)"
        ) from e


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with every load replaced by :func:`load_deepspeed_file` (saving unchanged).

    DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``, which runs any code a
    planted pickle carries; the engine reads every model and ZeRO file through ``checkpoint_engine.load``.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location)


def _deep_update(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend(_Distributed):
    """DeepSpeed engine (ZeRO 0-3) with a torch AdamW; runs on CPU (gloo) or CUDA (NCCL).

    Args:
        device: ``"cpu"`` or ``"cuda"``; sets ``DS_ACCELERATOR`` accordingly (see :func:`deepspeed_env`).
        precision: ``"fp32"``; ``"bf16"`` (see ``bf16_mode``); ``"fp16"`` = DeepSpeed fp16 with dynamic loss
            scaling (CUDA only; parameters and float inputs are cast to float16).
        zero_stage: ZeRO stage 0-3.
        micro_batch_size: samples per micro-batch per rank (``train_micro_batch_size_per_gpu``; DeepSpeed only
            uses it for its counters and throughput, the loader decides the real batch).
        bf16_mode: ``"autocast"`` (default) keeps an fp32 engine and runs forward under ``torch.autocast``
            bf16 - needed by timm Swin, whose attention mixes dtypes under a bf16 engine (frozen submodules
            keep bf16 weights: :func:`lower_frozen_precision`). ``"native"`` enables
            DeepSpeed's bf16 (bf16 parameters, fp32 master weights) and casts float inputs to bfloat16.
        config_overrides: merged last into the generated DeepSpeed config dict.
    """

    name = "deepspeed"

    def __init__(
        self,
        device: str = "cpu",
        precision: Precision = "fp32",
        *,
        zero_stage: int = 0,
        micro_batch_size: int = 1,
        bf16_mode: Literal["autocast", "native"] = "autocast",
        config_overrides: Mapping[str, Any] | None = None,
    ):
        self._device = resolve_device(device)
        _check_precision(precision, self._device)
        if zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        if bf16_mode not in ("autocast", "native"):
            raise ConfigError(f"bf16_mode must be 'autocast' or 'native', got {bf16_mode!r}")
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.precision, self.zero_stage, self.bf16_mode = precision, zero_stage, bf16_mode
        self.micro_batch_size = micro_batch_size
        self._overrides = dict(config_overrides or {})
        deepspeed_env(self._device.type)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        if accel != self._device.type:
            raise ConfigError(
                f"deepspeed already chose accelerator {accel!r}, but device {self._device.type!r} was "
                f"requested; "
                f"set DS_ACCELERATOR={self._device.type} before anything imports deepspeed"
            )
        deepspeed.init_distributed()  # no-op when the process group exists
        self._deepspeed = deepspeed
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self._engine: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._input_dtype: torch.dtype | None = None

    @property
    def engine(self) -> Any:
        """The ``deepspeed.DeepSpeedEngine`` (after :meth:`prepare`)."""
        if self._engine is None:
            raise RuntimeError("DeepSpeedBackend.prepare() has not been called")
        return self._engine

    @property
    def module(self) -> nn.Module:
        return self.engine.module  # type: ignore[no-any-return]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("DeepSpeedBackend.prepare() has not been called")
        return self._optimizer

    def ds_config(self, grad_accum: int = 1, clip_grad: float | None = None) -> dict[str, Any]:
        """The DeepSpeed config dict built from our settings (plus ``config_overrides``)."""
        native_bf16 = self.precision == "bf16" and self.bf16_mode == "native"
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": self.zero_stage},
            "gradient_clipping": float(clip_grad or 0.0),
            "bf16": {"enabled": native_bf16},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 2**31 - 1,  # the loop logs
            "wall_clock_breakdown": False,
        }
        return _deep_update(cfg, self._overrides)

    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_accum: int = 1,
        clip_grad: float | None = None,
    ) -> None:
        """``deepspeed.initialize`` with ``optimizer`` (a torch AdamW: no JIT-built DeepSpeed Adam)."""
        if grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {grad_accum}")
        config = self.ds_config(grad_accum, clip_grad)
        if self.precision == "bf16" and self.bf16_mode == "autocast":
            lower_frozen_precision(model, torch.bfloat16)  # before ZeRO-3 partitions the parameters
        self._engine, _, _, _ = self._deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        ckpt_engine = self._engine.checkpoint_engine
        if type(ckpt_engine) is not TorchCheckpointEngine:
            raise ConfigError(
                f"DeepSpeed checkpoint engine {type(ckpt_engine).__name__}: only DeepSpeed's torch engine is "
                f"supported (its loads go through weights_only=True); drop the 'checkpoint' config override"
            )
        self._engine.checkpoint_engine = _WeightsOnlyLoads(ckpt_engine)
        self._optimizer = optimizer
        native = config["bf16"]["enabled"] or config["fp16"]["enabled"]
        self._input_dtype = next(self._engine.module.parameters()).dtype if native else None
        # ZeRO-0 fp32 clips inside engine.step() without recording the norm; measure it ourselves there
        self._own_norm = not (native or self.zero_stage > 0)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16" and self.bf16_mode == "autocast":
            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: Any) -> dict[str, Any]:
        """Move ``batch`` to the device (floats cast to the engine dtype) and run the objective."""
        batch = move_to(batch, self._device, self._input_dtype)
        with self._autocast():
            return self.engine(batch)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward``: DeepSpeed divides by ``gradient_accumulation_steps`` itself."""
        self.engine.backward(loss)

    def step(self) -> float | None:
        """``engine.step``; returns the global grad norm on the accumulation boundary, else ``None``."""
        engine = self.engine
        boundary = bool(engine.is_gradient_accumulation_boundary())
        norm = _total_norm(_grads(self.optimizer)) if boundary and self._own_norm else None
        engine.step()
        if not boundary:
            return None
        if norm is None:
            value = engine.get_global_grad_norm()
            norm = math.nan if value is None else float(value)
        return norm

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered under ZeRO-3) weights of the objective, on the CPU; collective under ZeRO-3."""
        module = self.module
        if self.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """``engine.save_checkpoint``: DeepSpeed's files under ``<directory>/<tag>/``; every rank calls it."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        """``engine.load_checkpoint`` (model + optimizer states, every file read with ``weights_only=True``);
        returns our ``client_state``.

        Raises:
            CheckpointError: no DeepSpeed checkpoint here, or a file holds more than tensors and DeepSpeed state.
        """
        if not (Path(directory) / tag).is_dir():
            raise CheckpointError(
                f"{Path(directory) / tag}: no DeepSpeed checkpoint (written by the torch backend?)"
            )
        path, client = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"{Path(directory) / tag}: DeepSpeed could not load this checkpoint")
        return dict(client or {})
