"""The pretraining-step benchmark runs end to end on the tiny geometry, writes a complete results JSON, and a
second run compares itself with it (no timing assertions: the numbers depend on the machine and its load)."""

import json
import math

import pytest
from helpers.bench import load_benchmark

from gfm_core.errors import ConfigError
from gfm_core.training.backends.base import effective_precision


def _check_run(data):
    assert data["device"] == "cpu" and data["geometry"] == "tiny" and data["batch"] == 2
    assert data["mfu"] is None and data["mfu_note"] == "n/a on CPU"
    assert data["flops_per_step"] > 0 and data["speedup"] > 0
    assert isinstance(data["meets_target"], bool)
    machine, versions, settings = data["machine"], data["versions"], data["settings"]
    assert machine["cpu_model"] and machine["logical_cpus"] >= 1 and machine["threads"] >= 1
    assert machine["gpu_name"] is None and len(machine["load_avg_1_5_15"]) == 3
    assert versions["torch"] and versions["timm"] and versions["python"] and "deepspeed" in versions
    assert settings == {**settings, "geometry": "tiny", "batch": 2, "steps": 1, "warmup": 0, "compile": False}
    # the candidate runs what fit() would here (bf16 -> fp32 on a CPU without bf16 kernels), bounded in that dtype
    assert settings["precision_requested"] == "bf16"
    assert settings["precision"] == effective_precision("bf16", "cpu")
    ceiling = data["matmul_ceiling"]
    assert ceiling["precision"] == settings["precision"]
    assert ceiling["flops_per_s"] == max(ceiling["flops_per_s_before"], ceiling["flops_per_s_after"]) > 0
    assert len(ceiling["tflops_all"]) == ceiling["reps"]
    share = data["candidate"]["achieved_flops_per_s"] / ceiling["flops_per_s"]
    assert math.isclose(data["candidate_share_of_ceiling"], share)
    for name in ("baseline", "candidate"):
        v = data[name]
        assert len(v["step_s"]) == 1 and v["warmup_step_s"] == []
        s = v["step_s_stats"]
        assert s["median"] == v["step_s_median"] > 0 and s["iqr"] == 0 and s["q1"] <= s["median"] <= s["q3"]
        for key in ("images_per_s", "achieved_flops_per_s", "state_bytes"):
            assert v[key] > 0, (name, key)
        assert set(v["phases_s_median"]) == {"forward", "backward", "optimizer"}
        assert v["peak_mem_bytes"] is None or v["peak_mem_bytes"] >= v["state_bytes"]
        assert math.isfinite(v["first_loss"])
    # same initial weights and batch: the bf16 candidate computes the fp32 baseline's loss
    assert math.isclose(data["baseline"]["first_loss"], data["candidate"]["first_loss"], rel_tol=0.05)


def test_pretrain_step_benchmark_tiny_writes_results_and_compares(repo_root, tmp_path, capsys, monkeypatch):
    bench = load_benchmark(repo_root, monkeypatch)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    args = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    result = bench.main([*args, "--json", str(first)])
    data = json.loads(first.read_text())
    assert data == json.loads(json.dumps(result))
    _check_run(data)
    printed = capsys.readouterr().out
    assert "speedup" in printed and "MFU         n/a on CPU" in printed
    assert f"ceiling     {data['settings']['precision']} matmul" in printed
    assert "candidate at" in printed and str(first) in printed

    ckpt = bench.main([*args, "--grad-checkpointing", "--json", str(tmp_path / "ckpt.json")])
    assert ckpt["settings"]["grad_checkpointing"] and ckpt["baseline"]["first_loss"] == result["baseline"]["first_loss"]
    assert ckpt["flops_per_step"] == result["flops_per_step"]  # model FLOPs: recomputed forwards are not counted
    capsys.readouterr()

    data["versions"]["torch"] = "0.0-older"  # as if the first run had used another torch
    first.write_text(json.dumps(data))
    bench.main([*args, "--json", str(second), "--compare", str(first)])
    cmp = json.loads(second.read_text())["compare"]
    for name in ("baseline", "candidate"):
        v = cmp["variants"][name]
        assert v["median_ratio"] > 0 and v["previous_median_s"] == data[name]["step_s_median"]
    assert cmp["differs"] == {"versions.torch": ["0.0-older", result["versions"]["torch"]]}
    printed = capsys.readouterr().out
    assert "compare     with" in printed and "WARNING: not like for like: versions.torch" in printed


def test_compare_rejects_a_file_that_is_not_a_results_json(repo_root, tmp_path, monkeypatch):
    bench = load_benchmark(repo_root, monkeypatch)
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"speedup": 3.0}))
    with pytest.raises(ConfigError, match=r"--compare .*other\.json: no \['baseline', 'candidate', 'settings'\]"):
        bench.main(["--tiny", "--compare", str(bad)])
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read"):
        bench.main(["--tiny", "--compare", str(tmp_path / "missing.json")])
