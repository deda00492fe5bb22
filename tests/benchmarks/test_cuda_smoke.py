"""CUDA paths on a tiny model (marked ``gpu``: opt-in, run by ``scripts/device_check.sh`` on a lent GPU)."""

import importlib.util
import json
import math
import sys

import pytest
import timm
import torch

from gfm_core.models.backbones import set_fused_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fused_attention_on_cuda_matches_timms_path():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        img_size=64,
        window_size=4,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
    ).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    set_fused_attention(model, enabled=False)
    ref = model.forward_features(x)
    assert set_fused_attention(model) == 8
    torch.testing.assert_close(model.forward_features(x), ref, rtol=1e-4, atol=1e-4)


def test_pretrain_step_benchmark_on_cuda_reports_mfu(repo_root, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("pretrain_step", repo_root / "benchmarks" / "pretrain_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "step.json"
    bench.main(
        ["--tiny", "--device", "cuda", "--steps", "2", "--warmup", "1", "--peak-tflops", "100", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert data["device"] == "cuda" and data["machine"]["gpu_name"] and data["mfu"] > 0
    assert data["matmul_ceiling"]["flops_per_s"] > 0 and data["candidate"]["peak_mem_bytes"] > 0
    # same weights and batch: the bf16 candidate on CUDA computes the fp32 baseline's loss
    assert math.isclose(data["baseline"]["first_loss"], data["candidate"]["first_loss"], rel_tol=0.05)
