"""The demo pretraining step with the teacher's targets from the pool against the teacher run live on every view.

Both variants run the demo preset's objective (student, decoder, projector, EfficientNet-Lite0 teacher at its
configured size, bf16 teacher weights and bf16 autocast as ``gfm pretrain`` runs them) on one batch from the
demo pile's stream, with AdamW; ``pool`` passes the stream's precomputed ``teacher_target``, ``live`` drops it,
so the objective runs the frozen teacher on the batch. One process, alternating (ABBA) after warm-up steps;
step times are medians; the printed ratio is live seconds per step over pooled seconds per step.

Needs the demo pile's shards and teacher pool (``make demo`` or ``gfm demo-data && gfm ingest && gfm validate &&
gfm shards``; the pool is built on first use, about a minute)::

    .venv/bin/python benchmarks/teacher_pool.py [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.data import DataLoader

from gfm_core.config import load_params
from gfm_core.objectives import build_continual_pretrain
from gfm_core.stages import pretrain_stream


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round (4 rounds, ABBA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    params = load_params("params.yaml", preset=args.preset)
    obj = build_continual_pretrain(params.pretrain)
    if obj.teacher is None:
        raise SystemExit(f"preset {args.preset!r} has no teacher (alpha 0): nothing to compare")
    obj.teacher.lower_precision_(torch.bfloat16)
    batch = next(iter(DataLoader(pretrain_stream(params, obj, "cpu"), batch_size=params.pretrain.batch_size)))
    if "teacher_target" not in batch:
        raise SystemExit("the stream has no teacher pool (pretrain.teacher_pool is 0): nothing to compare")
    live = {k: v for k, v in batch.items() if k != "teacher_target"}
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(b: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = obj(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"pool": [], "live": []}
    for name, b in (("pool", batch), ("live", live), ("live", live), ("pool", batch)):
        for _ in range(args.warmup):
            step(b)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(b)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "machine": f"{_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch": params.pretrain.batch_size,
        "student_px": params.pretrain.student.img_size,
        "teacher": f"{params.pretrain.teacher.arch} at {params.pretrain.teacher.img_size} px",
        "seconds_per_step": {k: round(v, 4) for k, v in med.items()},
        "live_over_pool": round(med["live"] / med["pool"], 2),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
