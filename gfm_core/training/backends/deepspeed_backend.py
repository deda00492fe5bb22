"""DeepSpeed backend (ZeRO 0-3, CPU/gloo or CUDA/NCCL) and safe loading of DeepSpeed's checkpoint files."""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.training.backends.base import Distributed, Precision, check_precision, grads, total_norm
from gfm_core.training.backends.devices import free_port, lower_frozen_precision, move_to, resolve_device

_REPO = Path(__file__).resolve().parents[3]


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


class DeepSpeedBackend(Distributed):
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
        check_precision(precision, self._device)
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
        """The objective inside the engine (after :meth:`prepare`)."""
        return self.engine.module  # type: ignore[no-any-return]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW the engine steps (after :meth:`prepare`)."""
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
        norm = total_norm(grads(self.optimizer)) if boundary and self._own_norm else None
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
