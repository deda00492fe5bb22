"""Tensor-level peak memory of one pretraining step, baseline and candidate: what ``pretrain_step.py``'s RSS hides.

``pretrain_step.py`` measures peak RSS, which includes the allocator's slack (glibc heap pages, oneDNN
scratch). This script counts only tensors. It takes the resident state (weights, buffers, optimizer state:
the tensors' bytes), then adds the peak of one step's own tensors. That is the live bytes of every storage
that first appears during the step, summed after each ATen op through a ``TorchDispatchMode``. Storages
that existed before the step (the weights, AdamW's moments) are not counted twice. Each variant runs one
warm-up step first, so AdamW's state already exists. Memory only, no timing.

Usage (from the repository root)::

    .venv/bin/python benchmarks/tensor_memory.py --precision fp32 --grad-checkpointing   # paper geometry
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.pretrain_step import GEOMETRIES, build_variants  # noqa: E402


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode (not in ``existing``) that are alive after an op."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing = existing
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            self.current -= self.refs.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.refs and key not in self.existing:
                    self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def existing_storages() -> set[int]:
    """Data pointers of every tensor storage alive now."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases found by get_objects() warns
        warnings.simplefilter("ignore", FutureWarning)
        return {o.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Print and return ``{variant: {state_bytes, step_peak_bytes, peak_bytes}}`` and the candidate's ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="paper")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args(argv)
    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="gfm_tensor_mem_") as tmp:
        variants = build_variants(
            GEOMETRIES[args.geometry],
            torch.device("cpu"),
            args.batch,
            args.precision,
            Path(tmp),
            grad_checkpointing=args.grad_checkpointing,
        )[:2]
        for v in variants:
            v.step()
            mode = LiveTensors(existing_storages())
            with mode:
                v.step()
            state = v.state_fn()
            out[v.name] = {"state_bytes": state, "step_peak_bytes": mode.peak, "peak_bytes": state + mode.peak}
            print(
                f"{v.name:<10} state {state / 2**20:9,.0f} MiB + step tensors {mode.peak / 2**20:9,.0f} MiB "
                f"= {(state + mode.peak) / 2**20:9,.0f} MiB"
            )
    ratio = out["candidate"]["peak_bytes"] / out["baseline"]["peak_bytes"]
    print(f"candidate / baseline tensor peak: {ratio:.2f}x ({args.geometry}, batch {args.batch}, {args.precision})")
    return out


if __name__ == "__main__":
    main()
