#!/usr/bin/env bash
# One command for a lent GPU machine (issue 17, point 3): the CUDA tests (pytest -m gpu), the pretraining-step
# benchmark on CUDA (MFU against the GPU's dense bf16 peak), and the loader benchmark, merged into one JSON.
# Under 10 minutes on one H100/H200. Without CUDA it says so, skips the CUDA parts, runs the CPU-safe parts
# quickly (tiny step benchmark, small loader run) and exits 0.
#
#   scripts/device_check.sh [OUT_DIR]      # OUT_DIR default: $OUT, else benchmarks/results
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_BATCH (default 128: the issue's MFU target
# batch per GPU), GPU_STEPS (default 10).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
WORK="$OUT_DIR/device_check-$STAMP"
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CUDA=1
    echo "device_check: CUDA: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
else
    CUDA=0
    echo "device_check: SKIP the CUDA parts (pytest -m gpu, pretrain_step --device cuda): torch sees no CUDA device;"
    echo "device_check: running the CPU-safe parts only (tiny step benchmark, 64-image loader run)"
fi

status=0
run() {  # run NAME CMD...: log to $WORK/NAME.log, record the exit code
    local name=$1
    shift
    echo "device_check: $name: $*"
    local t0=$SECONDS
    "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >>"$WORK/steps.txt"
    if [ "$rc" -eq 5 ] && [ "$name" = pytest_gpu ]; then
        echo "device_check: note: no tests are marked gpu (pytest rc 5)"
    elif [ "$rc" -ne 0 ]; then
        echo "device_check: $name failed (rc $rc), see $WORK/$name.log"
        tail -n 20 "$WORK/$name.log"
        status=1
    fi
}

if [ "$CUDA" = 1 ]; then
    run pytest_gpu "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$WORK/pytest_gpu.xml"
    run pretrain_step "$PY" benchmarks/pretrain_step.py --device cuda --batch "${GPU_BATCH:-128}" \
        --steps "${GPU_STEPS:-10}" --json "$WORK/pretrain_step.json"
    run loader "$PY" benchmarks/loader.py --images 2000 --workers 0 --json "$WORK/loader.json"
else
    run pretrain_step "$PY" benchmarks/pretrain_step.py --device cpu --tiny --steps 2 --warmup 1 \
        --json "$WORK/pretrain_step.json"
    run loader "$PY" benchmarks/loader.py --images 64 --repeats 1 --batch-size 16 --json "$WORK/loader.json"
fi

"$PY" - "$WORK" "$CUDA" "$OUT_DIR/device_check-$STAMP.json" <<'EOF'
"""Merge the parts into one JSON: each step's exit code and seconds, the benchmarks' results, the pytest counts."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, cuda, out = Path(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])
steps = {}
for line in (work / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    steps[name] = {"rc": int(rc), "seconds": int(secs), "log": str(work / f"{name}.log")}
result = {"cuda": cuda, "skipped": [] if cuda else ["pytest_gpu", "pretrain_step --device cuda"], "steps": steps}
for name in ("pretrain_step", "loader"):
    f = work / f"{name}.json"
    result[name] = json.loads(f.read_text()) if f.exists() else None
xml = work / "pytest_gpu.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    result["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
out.write_text(json.dumps(result, indent=2) + "\n")
step = result["pretrain_step"]
if step:
    mfu = step.get("mfu")
    print(
        f"device_check: step speedup {step['speedup']:.2f}x, candidate {step['candidate']['achieved_flops_per_s'] / 1e12:.3f}"
        f" TFLOP/s, {step['candidate_share_of_ceiling']:.0%} of the measured {step['matmul_ceiling'].get('precision', 'bf16')} matmul ceiling"
        + (f", MFU {mfu:.1%}" if mfu is not None else "")
    )
print(f"device_check: results {out}")
EOF
[ $? -eq 0 ] || status=1
exit $status
