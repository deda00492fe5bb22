"""scripts/device_check.sh without a GPU: says it skips the CUDA parts, runs the CPU-safe ones, one JSON, rc 0."""

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_device_check_on_cpu_skips_cuda_and_merges_one_json(repo_root, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(repo_root / "scripts" / "device_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIP the CUDA parts" in proc.stdout
    (merged,) = tmp_path.glob("device_check-*.json")
    data = json.loads(merged.read_text())
    assert data["cuda"] is False and "pytest_gpu" in data["skipped"]
    assert {k: v["rc"] for k, v in data["steps"].items()} == {"pretrain_step": 0, "loader": 0}
    assert data["pretrain_step"]["geometry"] == "tiny" and data["pretrain_step"]["matmul_ceiling"]["flops_per_s"] > 0
    assert data["loader"]["median_images_per_s_per_core"]["shards"] > 0
