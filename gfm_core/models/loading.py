"""Backbones for fine-tuning: a pretraining export, the ImageNet teacher's checkpoint, or a random init.

:func:`load_task_backbone` builds the backbone named by a :class:`~gfm_core.config.BackboneSpec` at a task's
input size (and Swin window; timm resamples the relative-position tables in torch, no SciPy), headless, and
returns it with the normalisation its weights expect and the sha256 of the bytes it loaded
(:func:`backbone_sha256`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from gfm_core.config import BackboneSpec, TaskCfg
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import sha256_file, sha256_json
from gfm_core.models.weights import load_backbone, load_timm_weights

log = logging.getLogger(__name__)


@dataclass
class LoadedBackbone:
    """A timm backbone at the task's geometry and the normalisation its weights expect."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str
    source: str  # weight file, or "random"
    sha256: str  # of the weight file's bytes as loaded; random: of the recipe (see backbone_sha256)


def _check_no_scipy_interp() -> None:
    from timm.layers import pos_embed_rel

    if getattr(pos_embed_rel, "_USE_SCIPY", False):
        raise ConfigError(
            "TIMM_USE_SCIPY_INTERP is set: timm would resample Swin position tables with "
            "scipy.interpolate.interp2d, which SciPy 1.14 removed; unset it (timm then interpolates in torch)"
        )


def _geometry(task: TaskCfg, drop_path_rate: float, swin_like: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"img_size": task.img_size, "drop_path_rate": drop_path_rate}
    if task.window_size is not None:
        if not swin_like:
            raise ConfigError(
                f"finetune.tasks[{task.name}].window_size is set but the backbone takes no window size"
            )
        kw["window_size"] = task.window_size
    return kw


def _norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = pcfg.get("mean"), pcfg.get("std")
    if mean is None or std is None:
        raise ConfigError(f"{type(model).__name__}: no mean/std in its pretrained_cfg")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _export_hint(spec: BackboneSpec) -> str:
    if spec.ablation:
        return f"produce it with `gfm pretrain --ablation {spec.ablation}` (stages.run_pretrain(params, ablation))"
    return "produce it with `gfm pretrain` (stages.run_pretrain) or point finetune.models[].path at an export"


def distilled_teacher(spec: BackboneSpec) -> BackboneSpec:
    """``spec``; for a teacher that follows an export (``teacher_of``), the teacher that export's sidecar names,
    when its file is there with the recorded sha256 and is another file: after a retraining on a released teacher
    the ImageNet baseline is the teacher the student was distilled from, not the one in the params."""
    if spec.kind != "teacher" or spec.teacher_of is None:
        return spec
    side = Path(spec.teacher_of).with_suffix(".json")
    try:
        teacher = json.loads(side.read_text()).get("meta", {}).get("teacher")
    except (OSError, ValueError, AttributeError):
        return spec  # no export (yet): the configured teacher
    if not isinstance(teacher, dict):
        return spec
    file, arch, sha = teacher.get("file"), teacher.get("arch"), teacher.get("sha256")
    if not (file and arch and sha) or Path(file).resolve() == Path(str(spec.path)).resolve():
        return spec
    if not Path(file).is_file() or sha256_file(file) != sha:
        log.warning("%s: the export was distilled from %s (sha256 %s), which is not there with those bytes; "
                    "model %r stays %s", side, file, sha[:12], spec.name, spec.path)
        return spec
    log.info("model %r: %s %s, the teacher %s was distilled from (params name %s)", spec.name, arch, file, side,
             spec.path)
    return spec.model_copy(update={"path": Path(file), "arch": arch})


def backbone_sha256(spec: BackboneSpec) -> str:
    """What a fine-tuning run of ``spec`` starts from: the sha256 of its weight file (``export``, ``teacher``).

    A ``random`` backbone has no file: its identity is the sha256 of ``{kind, arch, timm_kwargs}``; with the
    run's seed (recorded next to it) that fixes the initial weights. A teacher that follows an export is the
    teacher it resolves to (:func:`distilled_teacher`).

    Raises:
        CheckpointError: the weight file is missing.
    """
    if spec.kind == "random":
        return sha256_json({"kind": "random", "arch": spec.arch, "timm_kwargs": spec.timm_kwargs})
    spec = distilled_teacher(spec)
    assert spec.path is not None
    if not Path(spec.path).is_file():
        hint = _export_hint(spec) if spec.kind == "export" else "copy the weights there or fix the path"
        raise CheckpointError(
            f"finetune.models[{spec.name}].path: {spec.path} not found; {hint}"
        )
    return sha256_file(spec.path)


def load_task_backbone(spec: BackboneSpec, task: TaskCfg, *, drop_path_rate: float = 0.0) -> LoadedBackbone:
    """The backbone of ``spec`` built for ``task``'s input size (and Swin window), headless.

    The weight file is hashed before and after loading, so ``sha256`` names the bytes that were loaded.

    Raises:
        CheckpointError: a weight file is missing, does not match its arch, or changed while being loaded.
        ConfigError: unknown arch, a window size for a backbone without one, SciPy interpolation requested.
    """
    _check_no_scipy_interp()
    spec = distilled_teacher(spec)
    if spec.kind == "export" and spec.path is not None and not Path(spec.path).is_file():
        raise CheckpointError(
            f"{spec.path}: backbone export of model {spec.name!r} not found; {_export_hint(spec)}"
        )
    sha = backbone_sha256(spec)
    if spec.kind == "export":
        assert spec.path is not None
        side = Path(spec.path).with_suffix(".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        swin_like = "window_size" in (meta.get("timm_kwargs") or {})
        model = load_backbone(spec.path, **_geometry(task, drop_path_rate, swin_like), **spec.timm_kwargs)
        arch = str(meta.get("arch", "?"))
        source = str(spec.path)
    elif spec.kind == "teacher":
        assert spec.path is not None and spec.arch is not None
        swin_like = spec.arch.startswith("swin") or "window_size" in spec.timm_kwargs
        kw = {"num_classes": 0, **spec.timm_kwargs, **_geometry(task, drop_path_rate, swin_like)}
        model = load_timm_weights(
            spec.arch,
            spec.path,
            field=f"finetune.models[{spec.name}].path",
            arch_field=f"finetune.models[{spec.name}].arch",
            **kw,
        )
        arch, source = spec.arch, str(spec.path)
    else:
        assert spec.arch is not None
        if not timm.is_model(spec.arch):
            raise ConfigError(f"finetune.models[{spec.name}].arch: {spec.arch!r} is not a timm model name")
        swin_like = spec.arch.startswith("swin") or "window_size" in spec.timm_kwargs
        kw = {"num_classes": 0, **spec.timm_kwargs, **_geometry(task, drop_path_rate, swin_like)}
        try:
            model = timm.create_model(spec.arch, pretrained=False, **kw)
        except TypeError as e:
            if "img_size" not in str(e):
                raise ConfigError(f"finetune.models[{spec.name}]: {spec.arch} rejects {kw} ({e})") from e
            kw.pop("img_size")
            model = timm.create_model(spec.arch, pretrained=False, **kw)
        arch, source = spec.arch, "random"
    if spec.kind != "random" and backbone_sha256(spec) != sha:
        raise CheckpointError(
            f"{spec.path}: the backbone of model {spec.name!r} changed while it was being loaded (a pretraining "
            f"or copy still writing it?); re-run `gfm finetune --model {spec.name}` once it is complete"
        )
    mean, std = _norm(model)
    return LoadedBackbone(model, mean, std, arch, source, sha)
