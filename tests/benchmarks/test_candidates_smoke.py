"""benchmarks/candidates.py on the tiny geometry: every variant steps, same first loss as the eager path."""

import json
import sys


def test_candidates_tiny_same_first_loss_and_a_results_json(repo_root, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root))
    for name in ("benchmarks.candidates", "benchmarks.pretrain_step", "benchmarks.record"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from benchmarks import candidates

    out = tmp_path / "c.json"
    argv = ["--geometry", "tiny", "--steps", "2", "--warmup", "0", "--variants", "sdpa,channels_last"]
    result = candidates.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["eager"]["ratio_to_eager"] == 1.0
    for name in ("sdpa", "channels_last"):
        v = result[name]
        assert len(v["step_s"]) == 2 and v["ratio_to_eager"] > 0
        assert v["first_loss_rel_diff"] < 1e-2, name  # the tolerance on the first steps
    assert result["settings"]["geometry"] == "tiny" and result["machine"]["threads"] >= 1
    from gfm_core.training.backends.base import effective_precision

    assert result["settings"]["precision"] == effective_precision("bf16", "cpu")  # what fit() runs here
