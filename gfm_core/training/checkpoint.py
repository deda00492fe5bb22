"""Atomic, exactly-resumable training checkpoints.

Layout under ``<out_dir>/checkpoints/``::

    step_000120/        # complete: renamed from step_000120.tmp/ after every file was written
      meta.json         # step, backend, world size, loop state (a readable copy of client_state)
      rng_rank0.pt ...  # python/numpy/torch/cuda RNG states, one file per rank
      state.pt          # torch backend: model, optimizer, scaler, client_state (weights_only-loadable)
      state/            # deepspeed backend: engine.save_checkpoint's own files, read back with weights_only=True
    step_000160.tmp/              # being written, or left by a crash: ignored
    latest                        # "step_000120": pointer for people and tools (resume scans the directories)
<out_dir>/checkpoints.stale-20250101T120000Z/   # an earlier run set aside by a fresh start (set_aside.json: why)

A directory rename is atomic on POSIX file systems, so a checkpoint directory without ``.tmp`` is always
complete. Multi-process runs assume every rank sees the same file system.

``meta.json`` carries the run's *fingerprint* (what the run is: data hash, params hash, teacher sha256, ...).
:func:`plan_start` compares it with the new run's before resuming: a checkpoint of another run is never
continued, and an earlier run's files are moved aside (:func:`set_aside`), never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gfm_core.errors import CheckpointError
from gfm_core.io import atomic_write, read_json, write_json, write_text
from gfm_core.training.backends import Backend

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_TAG = "state"
META_FILE = "meta.json"
LATEST_FILE = "latest"
STALE_PREFIX = "checkpoints.stale-"
SET_ASIDE_FILE = "set_aside.json"
LOCK_FILE = ".lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Restored:
    """What :func:`load_checkpoint` hands back after the backend has restored model and optimizer."""

    path: Path
    client_state: dict[str, Any]
    rng_state: dict[str, Any] | None  # None when this rank has no saved RNG file (world size changed)


# ----------------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states as tensors/ints/floats only, so ``torch.load(weights_only=True)`` accepts them."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "saved CUDA RNG states for %d devices, %d visible: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# ----------------------------------------------------------------------------------------------- discovery


def checkpoint_root(out_dir: str | Path) -> Path:
    """``<out_dir>/checkpoints``."""
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_name(step: int) -> str:
    """``step_000123``."""
    return f"step_{step:06d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory (``step_000123`` -> 123)."""
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step_000123)")
    return int(m.group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed, with ``meta.json``) under ``<out_dir>/checkpoints``, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / META_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``; ``*.tmp`` directories are ignored."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete leftover ``*.tmp`` directories and all but the newest ``keep`` checkpoints (``None``: keep all).

    Call it from rank 0 only, when no checkpoint is being written.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    removed = list_checkpoints(out_dir)[:-keep] if keep is not None else []
    root = checkpoint_root(out_dir)
    removed += [p for p in root.glob("*.tmp") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p)
    return removed


# ----------------------------------------------------------------------------------------------- save / load


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    backend: Backend,
    client_state: dict[str, Any],
    *,
    keep: int | None = None,
    fingerprint: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<out_dir>/checkpoints/step_<step>/`` atomically; every rank must call this.

    ``client_state`` (loop position, config) must hold only str/int/float/bool/None/list/dict values: it goes
    into ``meta.json`` and into a ``weights_only`` torch file. ``fingerprint`` (what the run is) goes into
    ``meta.json`` for :func:`plan_start`. Afterwards leftover ``*.tmp`` directories are removed and, with
    ``keep``, all but the newest ``keep`` checkpoints.
    """
    root = checkpoint_root(out_dir)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    if backend.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash
        tmp.mkdir(parents=True)
    backend.barrier()
    with atomic_write(tmp / f"rng_rank{backend.rank}.pt") as f:
        torch.save(capture_rng_state(), f)
    backend.save_checkpoint(tmp, STATE_TAG, client_state)
    backend.barrier()
    if backend.is_main:
        meta = {
            "step": step,
            "backend": backend.name,
            "precision": backend.precision,
            "world_size": backend.world_size,
            "created_unix": time.time(),
            "client_state": client_state,
            "fingerprint": dict(fingerprint) if fingerprint is not None else None,
        }
        write_json(tmp / META_FILE, meta)
        if final.exists():  # a fresh run re-reaching a step of an older one
            old = root / f"{final.name}.old.tmp"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        write_text(root / LATEST_FILE, final.name + "\n")
        prune_checkpoints(out_dir, keep)
    backend.barrier()
    return final


def load_checkpoint(path: str | Path, backend: Backend) -> Restored:
    """Restore model/optimizer(/scaler) through ``backend``; return the loop state and this rank's RNG state.

    The RNG state is returned, not applied: the loop restores it after it has re-created the data iterator and
    skipped to the saved position, which is what makes the next step identical to an uninterrupted run.

    Raises:
        CheckpointError: incomplete checkpoint, other backend, or files that do not match the model.
    """
    path = Path(path)
    meta = read_json(path / META_FILE)
    if meta.get("backend") != backend.name:
        raise CheckpointError(
            f"{path}: written by the {meta.get('backend')!r} backend, resuming with {backend.name!r}; "
            f"resume with the same backend or start fresh (resume: false)"
        )
    if meta.get("world_size") != backend.world_size:
        log.warning(
            "%s: saved with world size %s, resuming with %d: data order and RNG streams will differ",
            path,
            meta.get("world_size"),
            backend.world_size,
        )
    client_state = backend.load_checkpoint(path, STATE_TAG)
    rng_file = path / f"rng_rank{backend.rank}.pt"
    rng_state = None
    if rng_file.is_file():
        try:
            rng_state = torch.load(rng_file, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or foreign pickle: name the file
            raise CheckpointError(f"{rng_file}: cannot load RNG state ({type(e).__name__}: {e})") from e
    else:
        log.warning("%s: no RNG state for rank %d; random streams are not restored", path, backend.rank)
    return Restored(path=path, client_state=client_state, rng_state=rng_state)


# ----------------------------------------------------------------------------------------------- start plan

ResumeMode = bool | Literal["unfinished"]


@dataclass(frozen=True)
class StartPlan:
    """Where a run starts: the checkpoint to continue (``None`` = step 0), why, and whether an earlier run's
    files must be moved aside first."""

    checkpoint: Path | None
    reason: str
    set_aside: bool


def checkpoint_fingerprint(path: str | Path) -> dict[str, str] | None:
    """The fingerprint recorded in a checkpoint's ``meta.json`` (``None`` for checkpoints written without one)."""
    fp = read_json(Path(path) / META_FILE).get("fingerprint")
    return dict(fp) if isinstance(fp, dict) else None


def plan_start(
    out_dir: str | Path,
    *,
    resume: ResumeMode,
    fingerprint: Mapping[str, str] | None,
    total_steps: int,
) -> StartPlan:
    """Decide how a run in ``out_dir`` starts; reads only (every rank may call it before anything moves).

    - ``resume=False``: start fresh.
    - ``resume=True``: continue the newest complete checkpoint if its fingerprint equals ``fingerprint``
      (``None`` skips the comparison); a finished run stays finished (nothing left to do).
    - ``resume="unfinished"``: as ``True``, but a finished run (step >= ``total_steps``) is not continued: a new
      run starts (what a re-materialisation means; only an interrupted run is continued).

    Whenever it starts fresh and an earlier run left files (checkpoints, ``metrics.jsonl``), ``set_aside`` is
    True and ``reason`` says why.
    """
    out_dir = Path(out_dir)
    root = checkpoint_root(out_dir)
    leftovers = (root.is_dir() and any(root.iterdir())) or (out_dir / "metrics.jsonl").is_file()
    latest = latest_checkpoint(out_dir)
    if not resume:
        why = f"resume is off: starting fresh in {out_dir}"
        return StartPlan(None, why + (" (the earlier run's files are set aside)" if leftovers else ""), leftovers)
    if latest is None:
        return StartPlan(None, f"no complete checkpoint in {root}: starting fresh", leftovers)
    step = checkpoint_step(latest)
    if fingerprint is not None:
        saved = checkpoint_fingerprint(latest)
        if saved != dict(fingerprint):
            return StartPlan(
                None,
                f"{latest} belongs to another run ({_fingerprint_diff(saved, fingerprint)}): starting fresh",
                True,
            )
    if resume == "unfinished" and step >= total_steps:
        return StartPlan(
            None, f"{latest}: that run finished (step {step} of {total_steps}): starting a new run", True
        )
    same = f"; same {', '.join(sorted(fingerprint))}" if fingerprint else ""
    return StartPlan(latest, f"resuming from {latest} (step {step}{same})", False)


def _fingerprint_diff(saved: Mapping[str, str] | None, new: Mapping[str, str]) -> str:
    if saved is None:
        return "it records no fingerprint"
    changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k) != new.get(k))
    return "; ".join(f"{k}: {_short(saved.get(k))} -> {_short(new.get(k))}" for k in changed)


def _short(value: str | None) -> str:
    return "none" if value is None else (value[:12] + "..." if len(value) > 15 else value)


def set_aside(out_dir: str | Path, reason: str, files: Sequence[str] = ()) -> Path:
    """Move ``<out_dir>/checkpoints`` and the named ``files`` of ``out_dir`` into a new
    ``<out_dir>/checkpoints.stale-<UTC time>/`` with ``set_aside.json`` (why, when); deletes nothing.

    Call it from rank 0 only, after every rank has planned (:func:`plan_start`).
    """
    out_dir = Path(out_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out_dir / f"{STALE_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        dest, n = out_dir / f"{STALE_PREFIX}{stamp}-{n}", n + 1
    root = checkpoint_root(out_dir)
    if root.is_dir():
        os.replace(root, dest)
    else:
        dest.mkdir(parents=True)
    moved = [name for name in files if (out_dir / name).is_file()]
    for name in moved:
        os.replace(out_dir / name, dest / name)
    write_json(dest / SET_ASIDE_FILE, {"reason": reason, "set_aside_unix": time.time(), "files": moved})
    log.warning("%s; the earlier run's files are in %s", reason, dest)
    return dest


@contextlib.contextmanager
def exclusive_out_dir(out_dir: str | Path) -> Iterator[None]:
    """Hold ``<out_dir>/.lock`` (``flock``) for the block: two runs never write one ``out_dir`` at once.

    The kernel drops the lock when its process ends, even on ``kill -9``, so a crashed run never blocks the
    next. Take it on rank 0 only.

    Raises:
        CheckpointError: another process holds the lock (its pid and host are named).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK_FILE, "a+")  # held open for the whole block
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CheckpointError(
                f"{out_dir}: {holder} is training into this folder right now; wait for it to finish or stop "
                f"it (two runs must not share an out_dir)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock
