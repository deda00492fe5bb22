"""Warm-up + cosine learning-rate schedule and the linear batch-size scaling rule."""

from __future__ import annotations

import itertools
import math

import pytest

from gfm_core.training.schedule import lr_at

KW = dict(total_steps=100, warmup_steps=10, base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-4)


def test_warmup_is_linear_from_warmup_lr_to_base_lr():
    assert lr_at(0, **KW) == pytest.approx(1e-5)
    assert lr_at(5, **KW) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(10, **KW) == pytest.approx(1e-3)


def test_cosine_reaches_midpoint_and_floor():
    assert lr_at(55, **KW) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way through the 90 decay steps
    assert lr_at(100, **KW) == pytest.approx(1e-4)
    assert lr_at(250, **KW) == pytest.approx(1e-4)  # past the end: stays at the floor
    quarter = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.25))
    assert lr_at(35, **{**KW, "total_steps": 110}) == pytest.approx(quarter)  # 25 of 100 decay steps


def test_monotone_after_warmup_and_continuous_at_the_join():
    lrs = [lr_at(s, **KW) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert abs(lr_at(11, **KW) - lr_at(10, **KW)) < 1e-3 * 0.01


def test_no_warmup_starts_at_base_lr():
    assert lr_at(0, total_steps=10, warmup_steps=0, base_lr=0.1, warmup_lr=0.0, min_lr=0.0) == pytest.approx(
        0.1
    )
    assert lr_at(
        10, total_steps=10, warmup_steps=10, base_lr=0.1, warmup_lr=0.0, min_lr=0.0
    ) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "step, kw",
    [(-1, {}), (0, {"total_steps": 0}), (0, {"warmup_steps": 101}), (0, {"min_lr": -1.0})],
)
def test_invalid_arguments_raise(step, kw):
    with pytest.raises(ValueError):
        lr_at(step, **{**KW, **kw})


def test_schedule_scales_lrs_and_warms_up_the_sections_share():
    from gfm_core.config import FinetuneCfg, PretrainCfg
    from gfm_core.training.setup import schedule

    paper = schedule(PretrainCfg(), steps_per_epoch=10, epochs=100, limit=None, global_batch=1024)
    assert paper["base_lr"] == pytest.approx(4e-4) and paper["warmup_lr"] == pytest.approx(2e-6)
    assert paper["min_lr"] == pytest.approx(2e-5) and (paper["total_steps"], paper["warmup_steps"]) == (1000, 100)
    capped = schedule(FinetuneCfg(), steps_per_epoch=10, epochs=100, limit=60, global_batch=16)
    assert (capped["total_steps"], capped["warmup_steps"]) == (60, 12)  # 20 of 100 epochs: 20 % of 60 steps
    assert capped["base_lr"] == pytest.approx(1e-4 * 16 / 512)
    flat = schedule(PretrainCfg(lr_scaling="none"), steps_per_epoch=10, epochs=100, limit=None, global_batch=64)
    assert flat["base_lr"] == 2e-4
