"""Pretraining under a launcher, reporting to Dagster through Pipes: ``torchrun``/``deepspeed`` run this module.

The Dagster side (:class:`orchestration.resources.PretrainLauncher`) starts, e.g.::

    torchrun --nproc_per_node=8 -m orchestration.pipes_pretrain --params params.yaml
    deepspeed --num_gpus=8 --no_local_rank --module orchestration.pipes_pretrain --params params.yaml

through ``dagster.PipesSubprocessClient``. Every rank runs :func:`gfm_core.stages.run_pretrain`; rank 0 alone
opens the Pipes channel and streams each logged step back as a Dagster log line and a custom message
(``{"step": ..., "metrics": {...}}``), then the result (``{"result": {...}}``). When Dagster passes an MLflow
run id (Pipes extras ``mlflow_run_id``, ``tracking_uri``, ``experiment``), rank 0 resumes that run, so the
per-step metrics land in the asset's MLflow stage run as they happen. Imports dagster_pipes and gfm_core only
(not dagster, not torch directly); without Dagster it simply pretrains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gfm_core.config import Params, load_params, teacher_overrides


class PipesReporter:
    """``fit`` callback: each logged step to Dagster (a log line and a custom message)."""

    def __init__(self, pipes: Any) -> None:
        self.pipes = pipes

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Send the step's finite metrics as a log line and a custom message."""
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        self.pipes.log.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in clean.items()))
        self.pipes.report_custom_message({"step": step, "metrics": clean})

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Log where the step's checkpoint was written."""
        self.pipes.log.info(f"checkpoint at step {step}: {path}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this module (the launcher passes ``--params`` and the overrides)."""
    p = argparse.ArgumentParser(prog="python -m orchestration.pipes_pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--preset", default=None)
    p.add_argument("--ablation", default=None, help="a pretraining ablation of pretrain.ablations (e.g. mim_only)")
    p.add_argument("--teacher-checkpoint", default=None, help="override pretrain.teacher.checkpoint")
    p.add_argument("--teacher-arch", default=None, help="override pretrain.teacher.arch")
    p.add_argument("--resume", choices=("unfinished", "always", "never"), default="unfinished",
                   help="unfinished (default): continue an interrupted run of the same data, params and teacher, "
                        "else start fresh; always: also keep a finished run; never: start fresh")
    p.add_argument("--max-steps", type=int, default=None)
    return p


@contextlib.contextmanager
def _mlflow_run(extras: dict[str, Any]) -> Iterator[None]:
    run_id = extras.get("mlflow_run_id")
    if not run_id:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(extras["tracking_uri"])
    with mlflow.start_run(run_id=run_id):
        yield


def _pretrain(params: Params, args: argparse.Namespace, callbacks: Sequence[Any]) -> Any:
    from gfm_core import stages

    resume = {"unfinished": "unfinished", "always": True, "never": False}[args.resume]
    kw = dict(resume=resume, max_steps=args.max_steps, callbacks=list(callbacks))
    return stages.run_pretrain(params, args.ablation, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point on every rank."""
    args = build_parser().parse_args(argv)
    params = load_params(args.params, preset=args.preset,
                         overrides=teacher_overrides(args.teacher_checkpoint, args.teacher_arch))
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if os.environ.get("RANK", "0") != "0" or not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        _pretrain(params, args, ())
        return 0
    with open_dagster_pipes() as pipes:
        extras = dict(pipes.extras)
        with _mlflow_run(extras):
            res = _pretrain(params, args, [PipesReporter(pipes)])
        summary = json.loads(res.summary_json.read_text()) if res.summary_json.is_file() else {}
        pipes.report_custom_message({"result": {"backbone": str(res.backbone), "steps": res.steps,
                                                "device": res.device, "summary": summary}})
        pipes.log.info(f"pretraining done: {res.steps} steps, {res.summary()}; backbone {res.backbone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
