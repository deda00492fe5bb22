"""benchmarks/tensor_memory.py on the tiny geometry: checkpointing lowers the candidate's counted step peak."""

import sys


def test_tensor_memory_tiny_counts_state_and_checkpointing_lowers_the_step_peak(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root))
    for name in ("benchmarks.tensor_memory", "benchmarks.pretrain_step", "benchmarks.record"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from benchmarks import tensor_memory

    args = ["--geometry", "tiny", "--batch", "4", "--precision", "fp32"]
    plain = tensor_memory.main(args)
    ckpt = tensor_memory.main([*args, "--grad-checkpointing"])
    for run in (plain, ckpt):
        for v in run.values():
            assert v["state_bytes"] > 0 and v["step_peak_bytes"] > 0
            assert v["peak_bytes"] == v["state_bytes"] + v["step_peak_bytes"]
    base_a, base_b = plain["baseline"]["peak_bytes"], ckpt["baseline"]["peak_bytes"]
    assert abs(base_a - base_b) <= 0.05 * base_a  # the switch is the candidate's only
    assert ckpt["candidate"]["step_peak_bytes"] < plain["candidate"]["step_peak_bytes"]
