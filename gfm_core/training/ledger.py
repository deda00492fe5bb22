"""The compute ledger of a training run: device-hours, FLOPs, MFU, energy and CO2 (the paper's Table 1 columns).

- **FLOPs** are measured, not modelled: :class:`StepFlops` runs one optimizer step (forward + backward of every
  micro-batch) under torch's ``FlopCounterMode`` (matmuls, convolutions, attention: the FLOPs MFU counts), and
  the run's total is that step's count x ranks x steps.
- **Energy** is read where the platform exposes a counter (:class:`EnergyMeter`: RAPL package counters under
  ``/sys/class/powercap`` on CPU, NVML's total-energy counter on NVIDIA GPUs when ``nvidia-ml-py`` is installed);
  elsewhere it is power x time from the device table or ``compute`` settings, and the ledger says ``estimate``.
- **CO2** = energy x the configured grid intensity (``compute.grid_gco2_per_kwh``, its source stated).
- **Teacher pool**: with ``pretrain.teacher_pool`` the teacher's targets come from forwards run once, before
  training (:mod:`gfm_core.data.pretrain.teacher_pool`); the steps do not count them, so the ledger states that
  one-off cost beside them (``pool_flops``, ``pool_s``; ``pool_cached`` when this run read an earlier run's pool).
- **MFU** = achieved FLOP/s / the device's published dense peak at the run's precision (unknown on CPU unless
  ``compute.peak_tflops`` is given).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gfm_core.config.compute import ComputeCfg

log = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class DeviceSpec:
    """Published figures of one accelerator: board power (W) and dense peak TFLOP/s (no sparsity)."""

    match: str  # substring of torch.cuda.get_device_name()
    tdp_w: float
    peak_half: float  # bf16/fp16 tensor cores
    peak_fp32: float


#: NVIDIA datasheets (SXM parts); V100 has no bf16, its fp16 tensor-core peak stands for half precision.
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("V100", 300.0, 125.0, 15.7),
    DeviceSpec("A100", 400.0, 312.0, 19.5),
    DeviceSpec("H100", 700.0, 989.0, 67.0),
    DeviceSpec("H200", 700.0, 989.0, 67.0),
)


def device_name(device: str) -> str:
    """A readable name of the device a run uses: the GPU's name, or the CPU model and thread count."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads)"


def device_spec(name: str) -> DeviceSpec | None:
    """The table row whose ``match`` is in ``name``; None for CPUs and unknown devices."""
    return next((d for d in DEVICES if d.match in name), None)


class StepFlops:
    """Context manager: the FLOPs torch executes inside it (``flops``), or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.flops: int | None = None
        self._mode: Any = None

    def __enter__(self) -> StepFlops:
        if self.enabled:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.flops = int(self._mode.get_total_flops())
            self._mode = None


def _rapl_uj() -> dict[str, tuple[int, int]] | None:
    """Package-level RAPL counters ``{domain: (energy_uj, max_range_uj)}``; None when none is readable."""
    out = {}
    for d in sorted(RAPL_ROOT.glob("*rapl:*")):
        if d.name.count(":") != 1:  # intel-rapl:0 is a package; intel-rapl:0:0 a sub-domain of it
            continue
        with contextlib.suppress(OSError, ValueError):
            out[d.name] = (int((d / "energy_uj").read_text()), int((d / "max_energy_range_uj").read_text()))
    return out or None


def _nvml_mj(count: int) -> list[int] | None:
    """NVML's total-energy counters (mJ) of GPUs ``0..count-1``; None without NVML or a GPU."""
    if count < 1 or not torch.cuda.is_available():
        return None
    try:
        import pynvml  # nvidia-ml-py (the `gpu` extra)

        pynvml.nvmlInit()
        return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(i)))
                for i in range(count)]
    except Exception:  # no library, no driver, or a GPU without the counter: estimate instead
        return None


class EnergyMeter:
    """Energy used between :meth:`start` and :meth:`stop`, from RAPL or NVML counters where readable.

    RAPL counts whole CPU packages (every process on them) and NVML the node's first ``gpus`` GPUs, so on one
    node rank 0's reading covers its local ranks; other nodes are not measured (the ledger estimates them).
    """

    def __init__(self, gpus: int = 0) -> None:
        self.gpus = gpus
        self._rapl: dict[str, tuple[int, int]] | None = None
        self._nvml: list[int] | None = None

    def start(self) -> EnergyMeter:
        """Read the counters now."""
        self._nvml = _nvml_mj(self.gpus)
        self._rapl = None if self._nvml is not None else _rapl_uj()
        return self

    def stop(self) -> tuple[float, str] | None:
        """``(joules, source)`` since :meth:`start`, or None when no counter was readable."""
        if self._nvml is not None:
            now = _nvml_mj(self.gpus)
            if now is not None:
                return sum(b - a for a, b in zip(self._nvml, now, strict=True)) / 1e3, "nvml"
        if self._rapl is not None:
            now_r = _rapl_uj() or {}
            uj = sum((now_r[k][0] - a) % rng for k, (a, rng) in self._rapl.items() if k in now_r)  # wraps
            return uj / 1e6, "rapl"
        return None


@dataclass(frozen=True)
class Ledger:
    """What a training run cost (every field lands in ``summary.json`` / ``result.json`` under ``compute``)."""

    wall_s: float
    samples: int  # training samples processed (steps x global batch)
    device: str
    device_count: int
    device_hours: float
    steps: int
    flops_per_step: float | None
    flops: float | None
    achieved_tflops: float | None
    peak_tflops: float | None
    mfu: float | None
    energy_kwh: float
    energy_source: str  # "measured (rapl)", "measured (nvml)" or "estimate (<how>)"
    grid_gco2_per_kwh: float
    grid_source: str
    co2_kg: float
    pool_flops: float | None = None  # the teacher pool's forwards (one-off; not in ``flops``)
    pool_s: float | None = None
    pool_cached: bool | None = None  # read from an earlier run's file: its cost was paid there
    recompute: bool = False  # FLOPs include gradient checkpointing's recomputed forwards (MFU is then HFU)

    def to_json(self) -> dict[str, Any]:
        """The ledger as a JSON-ready dict."""
        return asdict(self)

    def metrics(self, prefix: str = "compute.") -> dict[str, float]:
        """Its numeric fields, for MLflow and Dagster metadata."""
        return {prefix + k: float(v) for k, v in asdict(self).items()
                if isinstance(v, int | float) and not isinstance(v, bool)}


def _estimate(cfg: ComputeCfg, spec: DeviceSpec | None, on_gpu: bool, count: int, wall_s: float) -> tuple[float, str]:
    """Joules from power x time, and how the power was chosen."""
    if cfg.device_watts is not None:
        watts, how = cfg.device_watts, f"compute.device_watts {cfg.device_watts:g} W"
    elif on_gpu and spec is not None:
        watts, how = spec.tdp_w, f"{spec.match} TDP {spec.tdp_w:g} W"
    else:
        threads = torch.get_num_threads()
        watts, how = cfg.cpu_watts_per_thread * threads, f"{threads} threads x {cfg.cpu_watts_per_thread:g} W"
    return watts * count * wall_s, f"estimate ({how} x {count} device(s) x time)"


def make_ledger(cfg: ComputeCfg, *, wall_s: float, steps: int, global_batch: int, flops_per_step: float | None,
                device: str, world_size: int, precision: str, energy: tuple[float, str] | None,
                pool: Mapping[str, Any] | None = None, recompute: bool = False) -> Ledger:
    """The ledger of a run of ``steps`` optimizer steps of ``global_batch`` samples in ``wall_s`` seconds on
    ``world_size`` ranks.

    ``flops_per_step`` is one step's count on all ranks; ``energy`` what :meth:`EnergyMeter.stop` returned
    (None: estimated from power x time); ``pool`` the teacher pool's ``cost`` (``flops``, ``seconds``, ``cached``);
    ``recompute``: the counted step ran gradient checkpointing, so its FLOPs include the recomputed forwards.
    """
    name = device_name(device)
    on_gpu = str(device).startswith("cuda")
    spec = device_spec(name) if on_gpu else None
    flops = flops_per_step * steps if flops_per_step is not None else None
    achieved = flops / wall_s / 1e12 if flops is not None and wall_s > 0 else None
    peak = cfg.peak_tflops or (None if spec is None else spec.peak_fp32 if precision == "fp32" else spec.peak_half)
    total_peak = peak * world_size if peak is not None else None
    joules, source = (energy[0], f"measured ({energy[1]})") if energy is not None else \
        _estimate(cfg, spec, on_gpu, world_size, wall_s)
    kwh = joules / 3.6e6
    return Ledger(
        wall_s=round(wall_s, 3), samples=steps * global_batch, device=name, device_count=world_size,
        device_hours=wall_s * world_size / 3600, steps=steps, flops_per_step=flops_per_step, flops=flops,
        achieved_tflops=achieved, peak_tflops=peak,
        mfu=achieved / total_peak if achieved is not None and total_peak else None,
        energy_kwh=kwh, energy_source=source, grid_gco2_per_kwh=cfg.grid_gco2_per_kwh, grid_source=cfg.grid_source,
        co2_kg=kwh * cfg.grid_gco2_per_kwh / 1000,
        pool_flops=pool.get("flops") if pool else None, pool_s=pool.get("seconds") if pool else None,
        pool_cached=pool.get("cached") if pool else None, recompute=recompute,
    )


@contextlib.contextmanager
def metered(device: str, world_size: int) -> Iterator[dict[str, Any]]:
    """Time and meter the enclosed run: yields a dict that holds ``wall_s`` and ``energy`` afterwards."""
    gpus = min(world_size, torch.cuda.device_count()) if str(device).startswith("cuda") else 0
    meter = EnergyMeter(gpus).start()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - t0
        out["energy"] = meter.stop()
        if out["energy"] is None:
            log.debug("no energy counter readable (RAPL/NVML) in pid %d: energy is estimated", os.getpid())


def extrapolate(ledger: dict[str, Any], samples: int) -> dict[str, float]:
    """Device-hours, kWh and kg CO2 of ``samples`` training samples at the rates a run's ledger measured.

    The rates are the run's own (its model, input size, precision and devices): extrapolating to another
    geometry needs a run at that geometry (the paper preset, or ``benchmarks/pretrain_step.py``).
    """
    if not ledger.get("samples") or not ledger.get("wall_s"):
        raise ValueError("the ledger records no samples or time: nothing to extrapolate from")
    rate = ledger["samples"] / ledger["wall_s"]  # samples/s on the run's devices together
    scale = samples / ledger["samples"]
    return {"samples_per_s": rate, "wall_h": samples / rate / 3600, "device_hours": ledger["device_hours"] * scale,
            "energy_kwh": ledger["energy_kwh"] * scale, "co2_kg": ledger["co2_kg"] * scale}
