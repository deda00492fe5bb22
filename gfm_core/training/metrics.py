"""What the loop logs: the objective's scalar loss components, averaged over a log window and ranks, and the
``metrics.jsonl`` record (one JSON line per logged step) they are written to."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from gfm_core.errors import ConfigError
from gfm_core.io import write_text
from gfm_core.training.backends import Backend

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class LogWindow:
    """Sums of loss components, samples and grad norms since the last log."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.samples = 0
        self.grad_norms: list[float] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing ``images_per_s`` from now (after time that should not count, such as a checkpoint)."""
        self.t0 = time.perf_counter()

    def add(self, components: dict[str, float], samples: int) -> None:
        """Add one micro-batch's loss components and its number of samples."""
        for k, v in components.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro += 1
        self.samples += samples

    def add_grad_norm(self, norm: float | None) -> None:
        """Record an optimizer step's grad norm (``None`` off the accumulation boundary, and NaN, are skipped)."""
        if norm is not None and not math.isnan(norm):
            self.grad_norms.append(norm)

    def reduce(self, backend: Backend, *, lr: float, epoch: int) -> dict[str, float]:
        """Mean of each component over micro-batches and ranks (a collective), then reset."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / self.micro for k in keys], dtype=torch.float64)
        values = backend.all_reduce_mean(values)
        metrics = dict(zip(keys, values.tolist(), strict=True))
        metrics["lr"] = lr
        if self.grad_norms:
            metrics["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        metrics["images_per_s"] = self.samples * backend.world_size / elapsed
        metrics["epoch"] = float(epoch)
        self._reset()
        return metrics


def scalar_components(out: Any) -> dict[str, float]:
    """Every scalar entry of the objective's output as a float (one device sync); non-scalars are skipped."""
    if not isinstance(out, dict) or "loss" not in out:
        raise ConfigError(
            f"the objective must return a dict with a 'loss' entry, got {type(out).__name__}"
            + (f" with keys {sorted(out)}" if isinstance(out, dict) else "")
        )
    names, tensors, plain = [], [], {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                names.append(k)
                tensors.append(v.detach().reshape(()).float())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            plain[k] = float(v)
    if "loss" not in names:
        raise ConfigError(f"the objective's 'loss' must be a scalar tensor, got {out['loss']!r:.80}")
    values = torch.stack(tensors).cpu().tolist()
    return {**dict(zip(names, values, strict=True)), **plain}


def all_finite(loss: float, backend: Backend) -> bool:
    """True when the loss is finite on every rank (all ranks then raise together instead of one hanging)."""
    bad = 0.0 if math.isfinite(loss) else 1.0
    if backend.world_size > 1:
        bad = float(backend.all_reduce_mean(torch.tensor([bad], dtype=torch.float64))[0])
    return bad == 0.0


def append_record(metrics_path: Path, record: dict[str, float]) -> None:
    """Append one logged step (``{"step": ..., **metrics}``) to ``metrics.jsonl``."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_records(metrics_path: Path, keep_until_step: int) -> None:
    """Drop ``metrics.jsonl`` records past the step this run starts from (they belong to a lost future)."""
    if metrics_path.exists():
        kept = []
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                log.warning("%s: dropping an unreadable line: %.80s", metrics_path, line)
                continue
            if record.get("step", 0) <= keep_until_step:
                kept.append(line)
        write_text(metrics_path, "".join(line + "\n" for line in kept))


def last_record(metrics_path: Path) -> dict[str, float]:
    """The metrics of the last record in ``metrics.jsonl`` (without ``step``); empty when there is none."""
    if not metrics_path.is_file():
        return {}
    lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    record = json.loads(lines[-1])
    record.pop("step", None)
    return {k: float(v) for k, v in record.items()}
