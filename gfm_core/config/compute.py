"""The ``compute`` section: how a training run's compute, energy and CO2 ledger is priced."""

from __future__ import annotations

from pydantic import Field

from gfm_core.config.base import Section


class ComputeCfg(Section):
    """Grid intensity, and the power and peak figures a run's ledger uses where nothing is measured.

    Energy is measured where the platform exposes it (RAPL counters on CPU, NVML on NVIDIA GPUs with
    ``nvidia-ml-py`` installed); otherwise it is power x time, labelled ``estimate``. The default grid intensity,
    475 gCO2/kWh, is what the paper's own figures imply (93.3 V100-hours at 300 W = 28.0 kWh -> 13.3 kg) and is
    close to the world-average electricity mix; set your grid's (e.g. from Ember or electricityMaps).
    """

    grid_gco2_per_kwh: float = Field(475.0, ge=0, description="grams of CO2 per kWh of the grid the run uses")
    grid_source: str = Field(
        "GFM paper: 13.3 kg for 93.3 V100-hours at 300 W (28.0 kWh)", description="where the intensity comes from"
    )
    cpu_watts_per_thread: float = Field(
        5.0, gt=0, description="estimate when no RAPL counter is readable: W per torch thread in use"
    )
    device_watts: float | None = Field(None, gt=0, description="override the device table's TDP (W per device)")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak dense TFLOP/s per device at the run's precision (MFU); None = the device "
        "table's (NVIDIA V100/A100/H100/H200), unknown on CPU unless given (benchmarks/pretrain_step.py measures "
        "this machine's matmul ceiling)",
    )
