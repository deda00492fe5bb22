"""The compute ledger's FLOPs per step (measured inside ``fit``) agree with ``benchmarks/pretrain_step.py``'s count
for the same geometry, batch and precision: the two count independently, so a ledger that dropped the backward
pass, the teacher or a micro-batch would fail here."""

import pytest
import torch
from helpers.bench import load_benchmark

from gfm_core.objectives import build_continual_pretrain
from gfm_core.training.backends import TorchBackend
from gfm_core.training.loop import LoopCfg, fit
from gfm_core.training.optim import param_groups


def test_fit_ledger_flops_match_the_benchmark_count(repo_root, tmp_path, monkeypatch):
    bench = load_benchmark(repo_root, monkeypatch)
    g, device, batch_size = bench.TINY, torch.device("cpu"), 2
    teacher = bench.write_teacher(g, tmp_path)
    cfg, _, backend = bench.build_candidate(g, device, "bf16", teacher, 1e-4, False)
    batch = bench.make_batch(g, batch_size, device)

    def fwd_bwd() -> None:  # what the benchmark counts: one micro-batch, forward + backward
        out = backend.forward(batch)
        backend.backward(out["loss"])
        backend.optimizer.zero_grad(set_to_none=True)

    bench_flops = bench.count_flops(fwd_bwd)
    grad_accum = 2  # the ledger counts every micro-batch of an optimizer step

    torch.manual_seed(0)
    fresh = build_continual_pretrain(cfg)
    fresh.train()
    loop = LoopCfg(total_steps=1, out_dir=tmp_path / "run", grad_accum=grad_accum, checkpoint_every=100,
                   resume=False, progress=False, fused_optimizer=True)
    result = fit(fresh, lambda epoch: [batch] * 4, TorchBackend("cpu", cfg.precision), loop,
                 param_groups(fresh, cfg.weight_decay))

    assert result.steps == 1 and bench_flops > 0
    per_micro_batch = result.flops_per_step / grad_accum
    print(f"ledger {per_micro_batch:.4g} vs benchmark {bench_flops:.4g} FLOPs per micro-batch")
    assert per_micro_batch == pytest.approx(bench_flops, rel=0.10)
