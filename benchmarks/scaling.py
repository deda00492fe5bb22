"""Scaling model: images/s and device-hours for 100 epochs of the full GeoPile from one measured step time.

The projection (:func:`project`) is arithmetic on three measured or stated numbers:

- ``step_s`` and ``batch``: the candidate's median step time and per-device batch from a results JSON of
  ``pretrain_step.py`` (one device: the CPU at the run's threads, or one GPU with ``--device cuda``);
- ``efficiency``: data-parallel efficiency, throughput on N devices over N x one device's (weak scaling: the
  same per-device batch). ``measure`` gives it for 2 processes here (gloo, 1 thread each, the
  ``TorchBackend`` DDP path that ``fit()`` runs under ``torchrun``).

Assumptions (printed with the table): every device runs the measured step time; the data pipeline keeps up;
efficiency measured at 2 processes holds at 8 and 64 devices (optimistic across nodes); no time for
evaluation, checkpoints or start-up; an epoch is each of the 587,954 GeoPile images once (the paper's
setting, ``pretrain.samples_per_epoch: None``). The paper's 93.3 V100-hours (as quoted in issue 17) are
device-hours on a different device, model code and precision: a reference, not a like-for-like comparison.

Usage (from the repository root)::

    .venv/bin/python benchmarks/scaling.py measure --geometry tiny --batch 4 --steps 8 --json /tmp/dp.json
    .venv/bin/python benchmarks/scaling.py project --results benchmarks/reference/<run>.json --dp /tmp/dp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GEOPILE_IMAGES = 587_954
EPOCHS = 100
PAPER_V100_HOURS = 93.3
DEVICE_COUNTS = (1, 8, 64)


@dataclass(frozen=True)
class Projection:
    """What ``devices`` devices need for ``epochs`` passes over ``images`` images."""

    devices: int
    efficiency: float
    images_per_s: float
    wall_hours: float
    device_hours: float


def project(
    step_s: float,
    batch: int,
    devices: int,
    efficiency: float,
    *,
    images: int = GEOPILE_IMAGES,
    epochs: int = EPOCHS,
) -> Projection:
    """Throughput and hours on ``devices`` devices from one device's step time.

    Args:
        step_s: one device's median step time (seconds per optimizer step of ``batch`` images).
        batch: images per device per step.
        devices: number of data-parallel devices.
        efficiency: data-parallel efficiency in (0, 1] (ignored for one device).
        images, epochs: the workload (default: the full GeoPile, 100 epochs).

    Returns:
        images/s = devices x eff x batch / step_s; wall hours = images x epochs / (images/s) / 3600;
        device-hours = wall hours x devices.

    Raises:
        ValueError: a non-positive input or an efficiency above 1.
    """
    if step_s <= 0 or batch < 1 or devices < 1 or images < 1 or epochs < 1:
        raise ValueError(f"step_s {step_s}, batch {batch}, devices {devices}, images, epochs must be positive")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency {efficiency} must be in (0, 1]")
    eff = 1.0 if devices == 1 else efficiency
    images_per_s = devices * eff * batch / step_s
    wall_h = images * epochs / images_per_s / 3600
    return Projection(devices, eff, images_per_s, wall_h, wall_h * devices)


def format_table(step_s: float, batch: int, efficiency: float, device: str) -> str:
    """The markdown table for 1, 8 and 64 devices, with the paper's reference row."""
    rows = [
        f"| devices ({device}) | DP efficiency | images/s | wall-clock hours | device-hours |",
        "|---|---|---|---|---|",
    ]
    for n in DEVICE_COUNTS:
        p = project(step_s, batch, n, efficiency)
        rows.append(
            f"| {n} | {p.efficiency:.2f} | {p.images_per_s:,.1f} | {p.wall_hours:,.1f} | {p.device_hours:,.0f} |"
        )
    paper_rate = GEOPILE_IMAGES * EPOCHS / (PAPER_V100_HOURS * 3600)
    rows.append(f"| paper (V100) | | {paper_rate:,.0f} per V100 (implied) | | {PAPER_V100_HOURS} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------- data-parallel efficiency


def worker(args: argparse.Namespace) -> None:
    """One rank: the candidate step (``TorchBackend``, DDP when ``WORLD_SIZE > 1``); rank 0 writes step times."""
    import torch

    from benchmarks.pretrain_step import GEOMETRIES, build_candidate, make_batch, write_teacher

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    g, device = GEOMETRIES[args.geometry], torch.device("cpu")
    batch = make_batch(g, args.batch, device, seed=rank)
    with tempfile.TemporaryDirectory(prefix=f"gfm_dp_{rank}_") as tmp:
        teacher = write_teacher(g, Path(tmp))
        _, _, backend = build_candidate(g, device, args.precision, teacher, 1e-4, False)
        times = []
        for i in range(args.warmup + args.steps):
            backend.barrier()
            t0 = time.perf_counter()
            out = backend.forward(batch)
            backend.backward(out["loss"])
            backend.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    if rank == 0:
        args.json.write_text(json.dumps({"world_size": world, "step_s": times, "threads": torch.get_num_threads()}))


def _run_worker(args: argparse.Namespace, nproc: int, out: Path) -> dict[str, Any]:
    common = [
        "worker",
        "--geometry",
        args.geometry,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--precision",
        args.precision,
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [
            torchrun,
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(args.port),
            __file__,
            *common,
        ]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return dict(json.loads(out.read_text()))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """1 process x 1 thread, then 2 gloo processes x 1 thread (one after the other); efficiency = t1 / t2."""
    from benchmarks import record

    with tempfile.TemporaryDirectory(prefix="gfm_dp_") as tmp:
        one = _run_worker(args, 1, Path(tmp) / "one.json")
        two = _run_worker(args, 2, Path(tmp) / "two.json")
    t1, t2 = statistics.median(one["step_s"]), statistics.median(two["step_s"])
    import torch

    result = {
        "machine": record.machine(torch.device("cpu")),
        "versions": record.versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "fn")},
        "one_process": one,
        "two_processes": two,
        "efficiency": t1 / t2,
        "method": "weak scaling: same per-rank batch; efficiency = median step (1 proc) / median step (2 procs, "
        "DDP gloo, rank 0)",
    }
    print(f"1 process: {t1:.3f} s/step; 2 gloo processes: {t2:.3f} s/step; efficiency {t1 / t2:.2f}")
    if args.json:
        record.write(result, args.json)
    return result


def main(argv: list[str] | None = None) -> Any:
    """``project`` (the table from a results JSON) or ``measure`` (2-process data-parallel efficiency)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("project", help="the table from a pretrain_step.py results JSON")
    pr.add_argument("--results", type=Path, required=True)
    eff = pr.add_mutually_exclusive_group(required=True)
    eff.add_argument("--efficiency", type=float, help="data-parallel efficiency in (0, 1]")
    eff.add_argument("--dp", type=Path, help="a results JSON of `scaling.py measure`")
    for name in ("measure", "worker"):
        m = sub.add_parser(name)
        m.add_argument("--geometry", default="tiny", choices=("tiny", "swinb-d2", "paper"))
        m.add_argument("--batch", type=int, default=4, help="images per rank per step")
        m.add_argument("--steps", type=int, default=8)
        m.add_argument("--warmup", type=int, default=2)
        m.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
        m.add_argument("--threads", type=int, default=1)
        m.add_argument("--port", type=int, default=29533)
        m.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "worker":
        return worker(args)
    if args.cmd == "measure":
        return measure(args)
    run = json.loads(args.results.read_text())
    efficiency = args.efficiency if args.dp is None else json.loads(args.dp.read_text())["efficiency"]
    step_s, batch = run["candidate"]["step_s_median"], run["batch"]
    device = f"{run['device_name']}, {run['threads']} thread(s)" if run["device"] == "cpu" else run["device_name"]
    capped = " (capped at 1)" if efficiency > 1 else ""
    print(f"{run['geometry']}, batch {batch}/device, {step_s:.3f} s/step (median), efficiency {efficiency:.2f}{capped}")
    print(format_table(step_s, batch, min(efficiency, 1.0), device))
    return [asdict(project(step_s, batch, n, min(efficiency, 1.0))) for n in DEVICE_COUNTS]


if __name__ == "__main__":
    main()
