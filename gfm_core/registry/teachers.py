"""The teacher registry folder: which checkpoints it holds (hashed once stable), and timm's pretrained names."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gfm_core.errors import ConfigError


@dataclass(frozen=True)
class TeacherFile:
    """A checkpoint in the teacher registry folder.

    ``arch`` comes from a sidecar ``<file stem>.json`` (``{"arch": ...}``), else from the file name when it
    starts with a timm model name (``<arch>[.<tag>].safetensors``, timm's own naming), else None (keep
    ``pretrain.teacher.arch``).
    """

    path: Path
    sha256: str
    arch: str | None


def teacher_stats(folder: str | Path, patterns: Sequence[str]) -> dict[str, list[int]]:
    """``{path: [size, mtime_ns]}`` of the checkpoints in ``folder`` matching ``patterns`` (no folder: none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()}):
        with contextlib.suppress(FileNotFoundError):  # removed between the listing and the stat
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


def scan_teachers(
    folder: str | Path, patterns: Sequence[str], stable: Mapping[str, Sequence[int]] | None = None
) -> dict[str, TeacherFile]:
    """``{sha256: TeacherFile}`` of the checkpoints in ``folder`` matching ``patterns`` (no folder: none).

    With ``stable`` (:func:`teacher_stats` of an earlier look), only files whose size and mtime are still the
    same are hashed and reported: a file still being copied waits until it has stopped changing.
    """
    from gfm_core.io import sha256_file

    out: dict[str, TeacherFile] = {}
    for path, st in teacher_stats(folder, patterns).items():
        if stable is not None and list(stable.get(path, ())) != st:
            continue
        p = Path(path)
        try:
            sha = sha256_file(p)
            if stable is not None and [p.stat().st_size, p.stat().st_mtime_ns] != st:
                continue  # it changed while being hashed
        except FileNotFoundError:
            continue
        out.setdefault(sha, TeacherFile(p, sha, _teacher_arch(p)))
    return out


def _teacher_arch(path: Path) -> str | None:
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            arch = json.loads(side.read_text()).get("arch")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{side}: teacher sidecar is not a JSON object with an 'arch' ({e})") from e
        return str(arch) if arch else None
    import timm

    name = path.name.split(".")[0]
    return name if timm.is_model(name) else None


def timm_teachers(patterns: Sequence[str]) -> tuple[str, list[str]]:
    """``(timm version, sorted pretrained names matching patterns)``: the ImageNet weights timm knows about."""
    import timm

    names: set[str] = set()
    for pat in patterns:
        names.update(timm.list_pretrained(pat))
    return timm.__version__, sorted(names)


def champion_teacher(
    model_name: str, alias: str, folder: str | Path, patterns: Sequence[str], in_force: Path | None
) -> TeacherFile | None:
    """The released teacher ``models:/<model_name>@<alias>`` was pretrained on, when it is not ``in_force`` (the
    params' teacher) and its file is in the teacher folder: a promoted teacher upgrade then sticks for scheduled
    retraining. None: no champion, the champion used the params' teacher, or its teacher file is gone."""
    import mlflow

    from gfm_core.io import sha256_file
    from gfm_core.registry.gate import version_at_alias

    champion = version_at_alias(mlflow.MlflowClient(), model_name, alias)
    sha = champion.tags.get("gfm.teacher_sha256") if champion is not None else None
    if not sha or (in_force is not None and in_force.is_file() and sha256_file(in_force) == sha):
        return None
    return scan_teachers(folder, patterns).get(sha)
