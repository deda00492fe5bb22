"""The training curve of a faster precision against fp32 on the demo pile: issue 17's "same curve within noise".

Runs the real pretraining stage (:func:`gfm_core.stages.run_pretrain`) on the embedded demo pile, once per
precision and seed, and stops it after its first ``--steps`` steps: the demo's own schedule (1,000 steps, warm-up
over the first 100), not a schedule squeezed into ``--steps``. The loss is logged at every step (no held-out
probe). A seed fixes the initial weights, the views, the masks and their order, so the runs of one seed differ
only in precision.
Two checks, both printed and written to a JSON:

- **first steps**: the relative difference of the loss at each of the first ``--first`` steps (the largest over
  seeds). Step 1 is the same weights on the same batch (target <= 1e-2); from step 2 on the weights differ by
  the rounding of the earlier updates, which AdamW's early, sign-like steps amplify: the curve check judges those;
- **curve**: each run's loss smoothed over ``--window`` steps; at every step, the gap between the precisions'
  seed means against the seed-to-seed spread (standard deviation over seeds of the reference precision's
  smoothed curve). The curves agree "within noise" when the largest gap is at most that spread: changing the
  precision moves the curve less than changing the seed does. The paired differences at the last step (the
  same seed in both precisions) are printed too: where one seed's runs part, the gap comes from that seed.

bf16 runs with ``GFM_FORCE_BF16=1`` (a CPU without bf16 kernels would otherwise train in fp32: see
:func:`gfm_core.training.backends.base.effective_precision`), so on such a host they are slow but still bf16.

Usage (from the repository root)::

    .venv/bin/python benchmarks/curve.py                     # fp32 vs bf16, seeds 0 1 2, 50 steps
    .venv/bin/python benchmarks/curve.py --steps 2 --seeds 0 1 --json /tmp/curve.json   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import record  # noqa: E402  (after the path insert: run as a script)


def demo_params(work: Path) -> Any:
    """The demo preset of ``params.yaml`` with every path under ``work``."""
    from gfm_core.config import parse_params
    from gfm_core.stages.data import demo_under

    raw = demo_under(yaml.safe_load((REPO / "params.yaml").read_text()), work)
    return parse_params(raw, source="benchmarks/curve.py")


def prepare(work: Path) -> Any:
    """Demo data -> ingest -> validate -> shards under ``work``; the parsed params."""
    from gfm_core import stages

    params = demo_params(work)
    stages.run_demo_data(params)
    stages.run_ingest(params, progress=False)
    stages.run_validate(params)
    stages.run_shards(params, progress=False)
    return params


class _Enough(Exception):
    """Raised by :class:`FirstSteps` to end a run after its first steps."""


class FirstSteps:
    """A ``fit`` callback: keeps the loss of every logged step and ends the run after ``steps`` of them."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.losses: list[float] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["loss"])
        if step >= self.steps:
            raise _Enough


def run_curve(params: Any, precision: str, seed: int, steps: int, pool: int, out_dir: Path) -> list[float]:
    """The losses of the first ``steps`` steps of the demo pretraining (its own schedule) in ``precision`` with
    ``seed``."""
    from gfm_core import stages
    from gfm_core.config import parse_params

    raw = params.model_dump(mode="json")
    raw["tracking"]["enabled"] = False  # a benchmark's runs stay out of the project's MLflow store
    raw["pretrain"].update(out_dir=str(out_dir), log_every=1, checkpoint_every=10**6, holdout_fraction=0.0,
                           teacher_pool=pool, seed=seed, precision=precision)
    first = FirstSteps(steps)
    try:
        stages.run_pretrain(parse_params({**raw, "preset": None}, source="benchmarks/curve.py"), callbacks=[first])
    except _Enough:
        pass
    if len(first.losses) != steps:
        raise RuntimeError(f"{out_dir}: {len(first.losses)} logged losses for {steps} steps")
    return first.losses


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def _over(gap: float, spread: float) -> float:
    """``gap / spread``; with no spread (identical seeds), 0 for no gap and infinity for any gap."""
    return gap / spread if spread > 0 else (0.0 if gap == 0 else float("inf"))


def compare(curves: dict[str, dict[int, list[float]]], ref: str, cand: str, first: int, window: int) -> dict:
    """The two checks of the module docstring on ``{precision: {seed: losses}}``."""
    seeds = sorted(curves[ref])
    first_rel = [max(abs(curves[cand][s][t] - curves[ref][s][t]) / abs(curves[ref][s][t]) for s in seeds)
                 for t in range(min(first, len(curves[ref][seeds[0]])))]
    sm = {p: {s: smooth(curves[p][s], window) for s in seeds} for p in (ref, cand)}
    steps = len(sm[ref][seeds[0]])
    gaps, spreads = [], []
    for t in range(steps):
        means = [statistics.fmean(sm[prec][s][t] for s in seeds) for prec in (ref, cand)]
        gaps.append(abs(means[1] - means[0]))
        spreads.append(statistics.stdev(sm[ref][s][t] for s in seeds) if len(seeds) > 1 else float("nan"))
    judged = range(min(window, steps) - 1, steps)  # from the first full window on
    ratio = max(_over(gaps[t], spreads[t]) for t in judged) if len(seeds) > 1 else float("nan")
    return {
        "first_steps_rel_diff": first_rel,
        "first_step_ok": first_rel[0] <= 1e-2,
        "gap": gaps,
        "seed_spread": spreads,
        "max_gap_over_spread": ratio,
        "curve_within_noise": ratio <= 1.0,
        "end_mean": {p: statistics.fmean(sm[p][s][-1] for s in seeds) for p in (ref, cand)},
        "end_diff_per_seed": {str(s): sm[cand][s][-1] - sm[ref][s][-1] for s in seeds},  # paired: same seed
    }


@contextlib.contextmanager
def _restore_env(name: str, value: str | None) -> Iterator[None]:
    """Put environment variable ``name`` back to ``value`` (None: unset) when the block ends."""
    try:
        yield
    finally:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (precision, seed), print both checks, write the JSON and return it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reference", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--candidate", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--pool", type=int, default=512, help="teacher pool views (one per precision, every seed)")
    p.add_argument("--first", type=int, default=3, help="steps of the first-steps check")
    p.add_argument("--window", type=int, default=10, help="steps of the smoothing window")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    curves: dict[str, dict[int, list[float]]] = {args.reference: {}, args.candidate: {}}
    seconds: dict[str, float] = {}
    forced = os.environ.get("GFM_FORCE_BF16")
    os.environ["GFM_FORCE_BF16"] = "1"  # measure bf16 itself, even where fit() would fall back to fp32
    with tempfile.TemporaryDirectory(prefix="gfm_curve_") as tmp, _restore_env("GFM_FORCE_BF16", forced):
        params = prepare(Path(tmp))
        for precision in curves:
            t0 = time.perf_counter()
            for seed in args.seeds:
                out = Path(tmp) / f"pretrain-{precision}-{seed}"
                curves[precision][seed] = run_curve(params, precision, seed, args.steps, args.pool, out)
                print(f"{precision} seed {seed}: loss {curves[precision][seed][0]:.4f} -> "
                      f"{curves[precision][seed][-1]:.4f}", flush=True)
            seconds[precision] = time.perf_counter() - t0
    result = {
        "schema": record.SCHEMA, "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": record.machine(torch.device("cpu")), "versions": record.versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "curves": {p: {str(s): c for s, c in v.items()} for p, v in curves.items()}, "seconds": seconds,
        **compare(curves, args.reference, args.candidate, args.first, args.window),
    }
    print("relative loss difference, largest over seeds: "
          + ", ".join(f"step {t + 1} {d:.1e}" for t, d in enumerate(result["first_steps_rel_diff"]))
          + f" (step 1, same weights and batch: target <= 1e-2 {'met' if result['first_step_ok'] else 'NOT met'})")
    print(f"curve ({args.window}-step mean, seeds {args.seeds}): largest gap between the precisions' means = "
          f"{result['max_gap_over_spread']:.2f}x the seed-to-seed spread "
          f"({'within noise' if result['curve_within_noise'] else 'NOT within noise'}); end loss "
          + ", ".join(f"{k} {v:.4f}" for k, v in result["end_mean"].items()))
    print(f"end, {args.candidate} - {args.reference} per seed (same weights, views and masks): "
          + ", ".join(f"seed {s} {d:+.4f}" for s, d in result["end_diff_per_seed"].items()))
    path = record.write(result, args.json or REPO / "benchmarks" / "results" /
                        f"curve-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json")
    print(f"results     {path}")
    return result


if __name__ == "__main__":
    main()
