"""What a benchmark run keeps so a later run can be compared with it: machine, versions, step-time statistics,
the machine's measured bf16 matmul ceiling, a default results path, and the comparison with a previous file.

Used by ``benchmarks/pretrain_step.py`` (and the loader benchmark's ``--json``); no gfm_core model code.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCHEMA = 1

#: Keys that make two runs' times incomparable when they differ (shown as a warning by ``compare``).
MACHINE_KEYS = ("device", "device_name", "cpu_model", "logical_cpus", "threads")
VERSION_KEYS = ("python", "torch", "timm", "deepspeed")
SETTING_KEYS = ("geometry", "batch", "precision", "compile")
#: The timed variants of a results file.
VARIANTS = ("baseline", "candidate")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    """An installed distribution's version, without importing it (None when absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, logical/usable cores, torch threads, GPU name (CUDA only), load average now."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": device.type,
        "device_name": gpu or cpu_model(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": torch.get_num_threads(),
        "gpu_name": gpu,
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }


def versions() -> dict[str, Any]:
    """Python, torch (and its CUDA), timm, deepspeed versions, and the repository's git commit."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": _version("timm"),
        "deepspeed": _version("deepspeed"),
        "git": commit,
    }


def stats(times: list[float]) -> dict[str, float]:
    """Median, quartiles and IQR (inclusive method; IQR 0 for a single time) of step times in seconds."""
    med = statistics.median(times)
    q1, q3 = (med, med)
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "iqr_rel": (q3 - q1) / med, "min": min(times)}


#: the matmul dtype that bounds a step trained in each precision (fp16 and bf16 autocast run their matmuls there)
CEILING_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def matmul_ceiling(
    device: torch.device, n: int, reps: int = 10, warmup: int = 2, precision: str = "bf16"
) -> dict[str, Any]:
    """``n x n @ n x n`` matmul FLOP/s in ``precision``'s dtype on this device with the current threads: median
    over ``reps``."""
    dtype = CEILING_DTYPES[precision]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    for i in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= warmup:
            rates.append(2 * n**3 / (time.perf_counter() - t0))
    return {
        "what": f"torch.mm {precision} {n}x{n} @ {n}x{n}, median of {reps} after {warmup} warm-up",
        "n": n,
        "precision": precision,
        "reps": reps,
        "tflops_all": [round(r / 1e12, 4) for r in rates],
        "flops_per_s": statistics.median(rates),
    }


def best_ceiling(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The higher of two ceiling measurements (before and after the timed steps: load on a shared machine only
    lowers it), with both kept."""
    best = max(before, after, key=lambda c: c["flops_per_s"])
    return {
        **best,
        "what": best["what"] + "; the higher of before/after the steps",
        "flops_per_s_before": before["flops_per_s"],
        "flops_per_s_after": after["flops_per_s"],
    }


def default_path(device: torch.device, name: str = "pretrain_step") -> Path:
    """``benchmarks/results/<name>-<device>-<UTC timestamp>.json`` (the folder is git-ignored)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / f"{name}-{device.type}-{stamp}.json"


def write(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented JSON (creating folders); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def load(path: Path) -> dict[str, Any]:
    """A previous results file, or a clear error naming it."""
    from gfm_core.errors import ConfigError

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--compare {path}: cannot read a results JSON ({exc})") from exc
    missing = [k for k in (*VARIANTS, "settings") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConfigError(f"--compare {path}: no {missing} in it; was it written by this benchmark (schema {SCHEMA})?")
    return data


def compare(now: dict[str, Any], prev: dict[str, Any], prev_path: Path) -> dict[str, Any]:
    """Per variant: this run's median step time over the previous run's (< 1 = faster now); what differs."""
    out: dict[str, Any] = {"previous": str(prev_path), "previous_created_utc": prev.get("created_utc"), "variants": {}}
    for name in VARIANTS:
        v, p = now[name], prev[name]
        if "step_s_stats" in p:
            out["variants"][name] = {
                "median_ratio": v["step_s_stats"]["median"] / p["step_s_stats"]["median"],
                "previous_median_s": p["step_s_stats"]["median"],
                "previous_iqr_rel": p["step_s_stats"]["iqr_rel"],
            }
    for key in ("matmul_ceiling",):
        if now.get(key) and prev.get(key):
            out["matmul_ceiling_ratio"] = now[key]["flops_per_s"] / prev[key]["flops_per_s"]
    diffs = {}
    for section, keys in (("machine", MACHINE_KEYS), ("versions", VERSION_KEYS), ("settings", SETTING_KEYS)):
        for k in keys:
            a, b = prev.get(section, {}).get(k), now.get(section, {}).get(k)
            if a != b:
                diffs[f"{section}.{k}"] = [a, b]
    out["differs"] = diffs
    return out


def format_compare(c: dict[str, Any]) -> str:
    """The comparison as printed lines."""
    lines = [f"compare     with {c['previous']} ({c.get('previous_created_utc')}); ratio = median now / then"]
    for name, v in c["variants"].items():
        lines.append(
            f"  {name:<10} {v['median_ratio']:.3f}x step time (then {v['previous_median_s']:.3f} s, "
            f"IQR {v['previous_iqr_rel']:.0%} of median)"
        )
    if "matmul_ceiling_ratio" in c:
        lines.append(f"  matmul ceiling {c['matmul_ceiling_ratio']:.3f}x then's")
    if c["differs"]:
        lines.append(
            "  WARNING: not like for like: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c["differs"].items())
        )
    else:
        lines.append("  same machine, versions and settings")
    return "\n".join(lines)


def progress(tag: str, msg: str) -> None:
    """A progress line on stderr."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)
