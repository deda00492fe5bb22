"""Atomic file writes, hashing, and safetensors weight IO with a JSON sidecar.

Temp files and folders of a write are named ``.<target>.gfm-tmp.<host>.<pid>.<random>`` beside the target, so
one left behind by a killed writer is recognisable: every writer removes the stale ones of its folder (same
host, writer process gone) before it starts. Renames into place are followed by an fsync of the folder, so a
crash right after a write cannot lose the rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from gfm_core.errors import CheckpointError

TEMP_TAG = "gfm-tmp"
_TEMP_NAME = re.compile(rf"^\.(?P<target>.+)\.{TEMP_TAG}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_prefix(target: str | Path) -> str:
    """The name prefix of this process's temp files for ``target`` (a random part follows)."""
    return f".{Path(target).name}.{TEMP_TAG}.{_host()}.{os.getpid()}."


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, from /proc), or None where /proc does not tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_alive(pid: int, modified: float) -> bool:
    """Whether the process that wrote a temp (last modified at ``modified``) may still be writing it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    started = _process_start(pid)
    return started is None or started <= modified + 1.0  # a process started after the write is a reused pid


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files and folders of ``folder`` whose writer (on this host) is gone; return them.

    Temps of live processes (this one included) and of other hosts (a shared file system) are left alone; a
    temp older than the live process that now holds its pid is stale.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    host = _host()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or m["host"] != host:
            continue
        try:
            if _writer_alive(int(m["pid"]), entry.stat(follow_symlinks=False).st_mtime):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        removed.append(Path(entry.path))
    return removed


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str | Path, dst: str | Path) -> None:
    """``os.replace`` then an fsync of ``dst``'s folder: the rename survives a crash."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def make_temp_dir(target: str | Path) -> Path:
    """A fresh temp folder beside ``target`` (to be renamed onto it), after cleaning stale temps there."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        durable_replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, trailing newline)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON, naming the file on failure."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a JSON-serialisable object (canonical form)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sidecar_path(weights: str | Path) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


def save_weights(path: str | Path, state_dict: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors (atomically) plus a JSON sidecar of ``meta`` and the file's ``weights_sha256``."""
    import torch
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    data = save(tensors)
    write_bytes(path, data)
    if meta is not None:
        write_json(sidecar_path(path), {**dict(meta), "weights_sha256": hashlib.sha256(data).hexdigest()})
    return Path(path)


def verify_weights(path: str | Path, *, required: bool = False) -> None:
    """Check a weight file against the ``weights_sha256`` its JSON sidecar records (when there is one).

    Weights and sidecar are two writes; a crash or a copy between them pairs one file with the other's
    description. ``required``: a sidecar without ``weights_sha256`` is an error too.

    Raises:
        CheckpointError: the file's sha256 differs from the sidecar's (or, when required, it records none).
    """
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        return
    meta = read_json(side)
    expected = meta.get("weights_sha256") if isinstance(meta, dict) else None
    fix = "re-export the weights / re-run pretraining (gfm pretrain) so that both are written together"
    if expected is None:
        if required:
            raise CheckpointError(f"{side}: no weights_sha256 for {path.name}; {fix}")
        return
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 {actual[:12]} is not the weights_sha256 {str(expected)[:12]} recorded in {side.name} "
            f"(weights and sidecar come from different writes); {fix}"
        )


def load_weights(path: str | Path) -> dict[str, Any]:
    """Load a state dict from safetensors, or from a legacy ``.pth``/``.pt`` with ``weights_only=True``.

    A checkpoint that wraps its weights in ``{"model": ...}`` or ``{"state_dict": ...}`` is unwrapped. A JSON
    sidecar's ``weights_sha256`` is checked first (:func:`verify_weights`).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    verify_weights(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code objects, wrong format
        raise CheckpointError(f"{path}: cannot load weights ({type(e).__name__}: {e})") from e
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)
