"""Pick the demo's pretraining learning rate: short MIM-only runs at several peak lrs, judged on held-out views.

    python scripts/lr_sweep.py --steps 400 --lrs 3e-4 1e-3 3e-3 1e-2

Each run is the demo preset's pretraining with ``alpha 0`` (no teacher: the sweep does not depend on it),
``lr_scaling: none`` and the given ``base_lr``, for ``--steps`` optimizer steps (the schedule compressed into
them). Prints and writes ``outputs/lr_sweep/sweep.json``: per lr, the held-out masked L1 divided by the trivial
visible-mean predictor's (lower is better) and the wall time. Needs the demo shards (``gfm shards``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gfm_core import stages
from gfm_core.config import load_params
from gfm_core.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    ap.add_argument("--out", type=Path, default=Path("outputs/lr_sweep"))
    args = ap.parse_args()
    base = load_params(args.params)
    rows = []
    for lr in args.lrs:
        cfg = base.pretrain.model_copy(update={
            "alpha": 0.0, "base_lr": lr, "lr_scaling": "none", "out_dir": args.out / f"lr{lr:g}",
            "checkpoint_every": args.steps,
        })
        t0 = time.perf_counter()
        res = stages.run_pretrain(base.model_copy(update={"pretrain": cfg}), max_steps=args.steps)
        m = res.metrics
        rows.append({"base_lr": lr, "steps": res.steps, "mim_holdout": m["mim_holdout"],
                     "mim_trivial_holdout": m["mim_trivial_holdout"],
                     "ratio": m["mim_holdout"] / m["mim_trivial_holdout"], "seconds": round(time.perf_counter() - t0)})
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["ratio"])
    write_json(args.out / "sweep.json", {"rows": rows, "best": best, "steps": args.steps})
    print(f"best base_lr {best['base_lr']:g}: held-out masked L1 {best['ratio']:.3f}x the trivial predictor's")


if __name__ == "__main__":
    main()
