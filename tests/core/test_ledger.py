"""The compute ledger: measured step FLOPs, energy counters, device-hours, MFU and CO2 arithmetic."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_training import TinyRegression, make_loader_factory
from torch import nn

from gfm_core.config import ComputeCfg
from gfm_core.training import ledger
from gfm_core.training.backends import TorchBackend
from gfm_core.training.ledger import EnergyMeter, StepFlops, device_spec, make_ledger
from gfm_core.training.loop import LoopCfg, fit
from gfm_core.training.optim import param_groups


def test_step_flops_count_forward_and_backward_matmuls():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with StepFlops() as counted:
        lin(x).sum().backward()
    assert counted.flops == 3 * 2 * 2 * 8 * 4  # forward, grad of input, grad of weight: 2*B*in*out each
    with StepFlops(enabled=False) as off:
        lin(x).sum().backward()
    assert off.flops is None


def test_fit_measures_one_step_on_every_rank(tmp_path):
    torch.set_num_threads(1)
    model = TinyRegression()
    cfg = LoopCfg(total_steps=3, out_dir=tmp_path, base_lr=1e-2, warmup_lr=1e-3, min_lr=1e-3, warmup_steps=1,
                  log_every=1, checkpoint_every=3, progress=False)
    res = fit(model, make_loader_factory(8), TorchBackend("cpu"), cfg, param_groups(model, weight_decay=0.05))
    # micro-batch 8: Linear(8, 32) and Linear(32, 4), each forward + grad input + grad weight (the input needs a
    # grad through the mask token): 3 x 2 x 8 x (8 x 32 + 32 x 4)
    assert res.flops_per_step == 3 * 2 * 8 * (8 * 32 + 32 * 4)


def test_the_papers_ledger_from_its_own_figures():
    """93.3 V100-hours at the V100's 300 W with the default grid intensity give the paper's 13.3 kg."""
    v100 = device_spec("Tesla V100-SXM2-32GB")
    assert v100 is not None and v100.tdp_w == 300 and device_spec("AMD EPYC 7B13") is None
    cfg = ComputeCfg(device_watts=v100.tdp_w)
    led = make_ledger(cfg, wall_s=93.3 * 3600, steps=1000, global_batch=2048, flops_per_step=2e15, device="cpu",
                      world_size=1, precision="fp16", energy=None)
    assert led.device_hours == pytest.approx(93.3)
    assert led.energy_kwh == pytest.approx(27.99) and led.energy_source.startswith("estimate")
    assert led.co2_kg == pytest.approx(13.3, abs=0.005)
    assert led.achieved_tflops == pytest.approx(2e18 / (93.3 * 3600) / 1e12) and led.mfu is None  # CPU: no peak


def test_mfu_against_a_given_peak_and_measured_energy():
    cfg = ComputeCfg(peak_tflops=2.0, grid_gco2_per_kwh=100)
    led = make_ledger(cfg, wall_s=10.0, steps=5, global_batch=8, flops_per_step=2e12, device="cpu", world_size=2,
                      precision="bf16", energy=(7.2e6, "rapl"))
    assert led.flops == 1e13 and led.achieved_tflops == pytest.approx(1.0)
    assert led.mfu == pytest.approx(0.25)  # 1 TFLOP/s over 2 devices x 2 TFLOP/s
    assert led.energy_kwh == pytest.approx(2.0) and led.energy_source == "measured (rapl)"
    assert led.co2_kg == pytest.approx(0.2)
    assert led.metrics()["compute.co2_kg"] == pytest.approx(0.2) and "compute.device" not in led.metrics()
    assert not led.recompute and led.pool_flops is None  # no checkpointing, no teacher pool
    pooled = make_ledger(cfg, wall_s=10.0, steps=5, global_batch=8, flops_per_step=2e12, device="cpu", world_size=2,
                         precision="bf16", energy=None, pool={"flops": 3e12, "seconds": 4.0, "cached": True},
                         recompute=True)
    assert (pooled.pool_flops, pooled.pool_s, pooled.pool_cached, pooled.recompute) == (3e12, 4.0, True, True)
    assert pooled.flops == 1e13  # the steps' count; the one-off pool stands beside it


def _rapl(root, name, uj, rng=1000):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "energy_uj").write_text(str(uj))
    (d / "max_energy_range_uj").write_text(str(rng))


def test_rapl_packages_are_summed_and_wrap_around(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger, "RAPL_ROOT", tmp_path)
    _rapl(tmp_path, "intel-rapl:0", 900)
    _rapl(tmp_path, "intel-rapl:1", 100)
    _rapl(tmp_path, "intel-rapl:0:0", 5)  # a sub-domain of package 0: not counted twice
    meter = EnergyMeter().start()
    _rapl(tmp_path, "intel-rapl:0", 100)  # wrapped past 1000: +200
    _rapl(tmp_path, "intel-rapl:1", 400)  # +300
    _rapl(tmp_path, "intel-rapl:0:0", 500)
    assert meter.stop() == (500 / 1e6, "rapl")
    monkeypatch.setattr(ledger, "RAPL_ROOT", tmp_path / "none")
    assert EnergyMeter().start().stop() is None  # nothing readable: the ledger estimates


def test_extrapolation_scales_the_measured_rates():
    led = make_ledger(ComputeCfg(), wall_s=100.0, steps=10, global_batch=16, flops_per_step=None, device="cpu",
                      world_size=1, precision="fp32", energy=(3.6e5, "rapl")).to_json()
    assert led["samples"] == 160
    full = ledger.extrapolate(led, 587_954 * 100)  # the full GeoPile schedule
    assert full["samples_per_s"] == pytest.approx(1.6)
    assert full["wall_h"] == pytest.approx(587_954 * 100 / 1.6 / 3600)
    assert full["energy_kwh"] == pytest.approx(0.1 * 587_954 * 100 / 160)
    with pytest.raises(ValueError, match="no samples"):
        ledger.extrapolate({**led, "samples": 0}, 10)


def test_gfm_estimate_prints_the_extrapolation(tmp_path, repo_root, capsys):
    from gfm_core import cli
    from gfm_core.io import write_json

    led = make_ledger(ComputeCfg(), wall_s=100.0, steps=10, global_batch=16, flops_per_step=None, device="cpu",
                      world_size=1, precision="fp32", energy=None)
    write_json(tmp_path / "summary.json", {"compute": led.to_json()})
    argv = ["estimate", "--params", str(repo_root / "params.yaml"), "--summary", str(tmp_path / "summary.json"),
            "--images", "1600", "--epochs", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1.6 images/s" in out and "1,600 images x 2 epochs: 0.6 h wall" in out and "93.3 V100-hours" in out
    assert cli.main([*argv[:3], "--summary", str(tmp_path / "none.json")]) == 2
    assert "no compute ledger" in capsys.readouterr().err
