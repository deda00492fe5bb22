"""``gfm release-teacher``: put a new ImageNet teacher into the teacher registry folder, for the sensor to see.

The weights land as ``<teacher_dir>/<timm arch>.safetensors`` (timm's naming) next to a sidecar ``<arch>.json``
recording ``arch``, ``sha256``, ``source`` and ``imagenet_top1`` (plus the export's provenance and
``weights_sha256``, which :func:`gfm_core.io.verify_weights` checks when the teacher is loaded). Both files are
written atomically (temp file, then rename), the sidecar first, so a scan never sees weights without their arch.
Releasing the same teacher again writes nothing: the sensor sees no change and launches no run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfm_core.errors import ConfigError
from gfm_core.io import read_json, sidecar_path, write_bytes, write_json


@dataclass(frozen=True)
class Release:
    """A released teacher: its weight file, sidecar, sha256, and whether this call wrote them."""

    path: Path
    sidecar: Path
    arch: str
    sha256: str
    written: bool


def _packaged(name: str) -> Any | None:
    """The packaged teacher called ``name`` (``lite2``) or ``arch`` (``tf_efficientnet_lite2``), else None."""
    from gfm_core.models.imagenet_weights import TEACHERS

    return TEACHERS.get(name) or next((t for t in TEACHERS.values() if t.arch == name), None)


def _serialise(name: str, source: Path | None) -> tuple[str, bytes, dict[str, Any]]:
    """``(arch, safetensors bytes, sidecar)`` of the teacher to release."""
    from safetensors.torch import save

    from gfm_core.demo.packages import PINS
    from gfm_core.io import load_weights, sha256_file
    from gfm_core.models.imagenet_weights import TEACHERS, load_teacher_state_dict, source_weights_path

    teacher = _packaged(name)
    if teacher is not None and source is None:
        state = load_teacher_state_dict(teacher)
        meta: dict[str, Any] = {"source": f"{PINS[teacher.package]} {teacher.source_file}",
                                "source_sha256": sha256_file(source_weights_path(teacher)),
                                "imagenet_top1": teacher.imagenet_top1, "num_tensors": len(state)}
        arch = teacher.arch
    elif source is not None:
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"release-teacher {name!r}: with a weights file, the name must be a timm "
                              f"architecture (e.g. tf_efficientnet_lite2)")
        state = load_weights(source)  # errors name the file
        meta = {"source": str(source), "imagenet_top1": None, "num_tensors": len(state)}
        arch = name
    else:
        valid = ", ".join(f"{t.name} ({t.arch}, ImageNet top-1 {t.imagenet_top1} %)" for t in TEACHERS.values())
        raise ConfigError(f"release-teacher {name!r}: unknown teacher; valid: {valid}; or a timm architecture "
                          f"with --weights FILE")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = save(tensors)
    sha = hashlib.sha256(data).hexdigest()
    return arch, data, {"arch": arch, "sha256": sha, "weights_sha256": sha, **meta}


def release_teacher(teacher_dir: str | Path, name: str, *, source: str | Path | None = None) -> Release:
    """Export teacher ``name`` into ``teacher_dir`` as ``<arch>.safetensors`` + ``<arch>.json``.

    Args:
        teacher_dir: ``retrain.teacher_dir`` (created if missing).
        name: a packaged teacher (``lite0``, ``lite1``, ``lite2``, or its timm arch); with ``source``, any timm
            architecture.
        source: a weight file (safetensors / .pth state dict) to release under the architecture ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
        MissingDependencyError: the teacher's package is not installed.
    """
    arch, data, meta = _serialise(name, Path(source) if source is not None else None)
    path = Path(teacher_dir) / f"{arch}.safetensors"
    side = sidecar_path(path)
    if path.is_file() and side.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"] \
            and read_json(side) == meta:
        return Release(path, side, arch, meta["sha256"], written=False)  # already released: touch nothing
    write_json(side, meta)
    write_bytes(path, data)
    return Release(path, side, arch, meta["sha256"], written=True)
