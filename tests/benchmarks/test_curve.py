"""The curve check of ``benchmarks/curve.py``: its verdicts on hand-made curves (its runs of the real pretraining:
``tests/e2e/test_stages.py``)."""

import math

import pytest
from helpers.bench import load_benchmark


@pytest.fixture
def curve(repo_root, monkeypatch):
    return load_benchmark(repo_root, monkeypatch, "curve")


def test_smooth_is_a_trailing_mean(curve):
    assert curve.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_same_curves_within_noise_and_a_shift_beyond_the_seed_spread_is_not(curve):
    ref = {0: [1.0, 0.8, 0.7, 0.6], 1: [1.1, 0.9, 0.8, 0.7], 2: [0.9, 0.7, 0.6, 0.5]}  # seed spread 0.1 everywhere
    near = {s: [v * 1.001 for v in c] for s, c in ref.items()}
    out = curve.compare({"fp32": ref, "bf16": near}, "fp32", "bf16", first=2, window=2)
    assert out["curve_within_noise"] and out["first_step_ok"]
    assert out["first_steps_rel_diff"] == pytest.approx([1e-3, 1e-3])
    # smoothed seed means of ref at steps 2-4: 0.9, 0.75, 0.65; near is 0.1 % above: gaps 9e-4 .. 6.5e-4 over 0.1
    assert out["max_gap_over_spread"] == pytest.approx(0.9 * 1e-3 / 0.1)
    shifted = {s: [v + 0.15 for v in c] for s, c in ref.items()}  # 1.5x the spread, from the first step
    out = curve.compare({"fp32": ref, "bf16": shifted}, "fp32", "bf16", first=1, window=2)
    assert not out["curve_within_noise"] and not out["first_step_ok"]
    assert out["max_gap_over_spread"] == pytest.approx(1.5)
    assert math.isclose(out["end_mean"]["bf16"] - out["end_mean"]["fp32"], 0.15)
    assert out["end_diff_per_seed"] == pytest.approx({"0": 0.15, "1": 0.15, "2": 0.15})
    same = curve.compare({"fp32": {0: [1.0, 0.5], 1: [1.0, 0.5]}, "bf16": {0: [1.0, 0.5], 1: [1.0, 0.6]}},
                         "fp32", "bf16", first=1, window=1)
    assert same["max_gap_over_spread"] == float("inf")  # identical seeds: no spread, any gap is out of it
