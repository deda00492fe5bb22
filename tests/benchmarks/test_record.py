"""The benchmarks' results helpers: step-time statistics, the matmul ceiling, the comparison of two runs."""

import math
import sys

import pytest
import torch


@pytest.fixture
def record(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root))
    monkeypatch.delitem(sys.modules, "benchmarks.record", raising=False)
    from benchmarks import record

    return record


def test_stats_median_and_interquartile_range(record):
    s = record.stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"]) == (3.0, 2.0, 4.0, 2.0, 1.0)
    assert math.isclose(s["iqr_rel"], 2.0 / 3.0)
    one = record.stats([0.5])
    assert one["median"] == one["q1"] == one["q3"] == 0.5 and one["iqr"] == 0.0


def test_matmul_ceiling_measures_bf16_flops(record):
    c = record.matmul_ceiling(torch.device("cpu"), 64, reps=3, warmup=1)
    assert c["n"] == 64 and len(c["tflops_all"]) == 3 and c["flops_per_s"] > 0
    assert "bf16 64x64" in c["what"] and c["precision"] == "bf16"


def test_matmul_ceiling_in_the_candidates_dtype(record):
    c = record.matmul_ceiling(torch.device("cpu"), 64, reps=2, warmup=0, precision="fp32")
    assert "fp32 64x64" in c["what"] and c["precision"] == "fp32" and c["flops_per_s"] > 0


def test_compare_ratios_and_what_differs(record, tmp_path):
    def run(median, torch_version, threads):
        variant = {"step_s_stats": {"median": median, "iqr_rel": 0.1}}
        return {
            "created_utc": "t",
            "baseline": variant,
            "candidate": variant,
            "machine": {"device": "cpu", "threads": threads},
            "versions": {"torch": torch_version},
            "settings": {"geometry": "paper", "batch": 8},
            "matmul_ceiling": {"flops_per_s": 2.0},
        }

    c = record.compare(run(1.0, "2.14", 2), run(2.0, "2.13", 1), tmp_path / "prev.json")
    assert c["variants"]["candidate"]["median_ratio"] == 0.5 and c["matmul_ceiling_ratio"] == 1.0
    assert c["differs"] == {"machine.threads": [1, 2], "versions.torch": ["2.13", "2.14"]}
    text = record.format_compare(c)
    assert "0.500x step time" in text and "WARNING: not like for like: machine.threads 1 -> 2" in text
    assert record.compare(run(1.0, "2.14", 2), run(1.0, "2.14", 2), tmp_path)["differs"] == {}


def test_best_ceiling_keeps_the_higher_and_both_values(record):
    low, high = ({"what": "mm", "n": 8, "reps": 1, "tflops_all": [v], "flops_per_s": v} for v in (1.0, 3.0))
    best = record.best_ceiling(low, high)
    assert best["flops_per_s"] == 3.0 and (best["flops_per_s_before"], best["flops_per_s_after"]) == (1.0, 3.0)
    assert record.best_ceiling(high, low)["flops_per_s"] == 3.0
