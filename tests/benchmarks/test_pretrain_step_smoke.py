"""The pretraining-step benchmark runs end to end on the tiny geometry and writes a complete JSON (no timing
assertions: the numbers depend on the machine and its load)."""

import importlib.util
import json
import math
import sys


def _load_benchmark(repo_root, monkeypatch):
    path = repo_root / "benchmarks" / "pretrain_step.py"
    spec = importlib.util.spec_from_file_location("pretrain_step", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_pretrain_step_benchmark_tiny(repo_root, tmp_path, capsys, monkeypatch):
    bench = _load_benchmark(repo_root, monkeypatch)
    out = tmp_path / "step.json"
    result = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["device"] == "cpu" and data["geometry"] == "tiny" and data["batch"] == 2
    assert data["mfu"] is None and data["mfu_note"] == "n/a on CPU"
    assert data["flops_per_step"] > 0 and data["speedup"] > 0
    assert isinstance(data["meets_target"], bool)
    for name in ("baseline", "candidate"):
        v = data[name]
        assert len(v["step_s"]) == 1
        for key in ("step_s_median", "images_per_s", "achieved_flops_per_s", "state_bytes"):
            assert v[key] > 0, (name, key)
        assert set(v["phases_s_median"]) == {"forward", "backward", "optimizer"}
        assert v["peak_mem_bytes"] is None or v["peak_mem_bytes"] >= v["state_bytes"]
        assert math.isfinite(v["first_loss"])
    # same initial weights and batch: the bf16 candidate computes the fp32 baseline's loss
    assert math.isclose(data["baseline"]["first_loss"], data["candidate"]["first_loss"], rel_tol=0.05)
    printed = capsys.readouterr().out
    assert "speedup" in printed and "MFU         n/a on CPU" in printed
