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

Modules: :mod:`.base` (the :class:`Backend` protocol and what both backends share), :mod:`.devices` (device
and batch helpers), :mod:`.torch_backend`, :mod:`.deepspeed_backend` (with DeepSpeed's safe checkpoint loading).
"""

from gfm_core.training.backends.base import Backend, Precision
from gfm_core.training.backends.deepspeed_backend import DeepSpeedBackend, deepspeed_env, load_deepspeed_file
from gfm_core.training.backends.devices import auto_device, free_port, lower_frozen_precision, move_to, resolve_device
from gfm_core.training.backends.torch_backend import TorchBackend

__all__ = [
    "Backend",
    "DeepSpeedBackend",
    "Precision",
    "TorchBackend",
    "auto_device",
    "deepspeed_env",
    "free_port",
    "load_deepspeed_file",
    "lower_frozen_precision",
    "move_to",
    "resolve_device",
]
