"""Weights from local files only: a timm architecture with a checkpoint file (strict, sha256-checked against
its sidecar), or a backbone exported by pretraining (its sidecar names the architecture). Nothing is downloaded:
``pretrained_cfg_overlay=dict(file=...)`` with no hub source.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import timm
from torch import nn

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import read_json, sidecar_path, verify_weights

_log = logging.getLogger(__name__)
_TIMM_BUILDER_LOGGER = "timm.models._builder"


def load_timm_weights(
    arch: str,
    file: str | Path,
    *,
    field: str = "checkpoint",
    arch_field: str = "arch",
    overlay: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file), **kwargs)``, strict.

    ``overlay`` adds ``pretrained_cfg`` fields (mean, std, input_size, num_classes of the file).
    ``img_size`` is dropped for architectures that do not take it (CNNs accept any input size). Loading is
    strict: a key the model misses or the checkpoint has in excess raises (timm only logs those when the
    classifier is being replaced, e.g. ``num_classes=0``).

    Raises:
        ConfigError: unknown arch or kwargs.
        CheckpointError: missing, unreadable or mismatching file, or not the bytes its sidecar's
            ``weights_sha256`` describes.
    """
    check_arch(arch, arch_field)
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise CheckpointError(
            f"{field}: weight file {path} not found; copy the weights there or point {field} at a local "
            f".safetensors/.pth file (nothing is downloaded)"
        )
    verify_weights(Path(file).expanduser())  # its sidecar's weights_sha256, when it has one (beside a symlink too)
    # source='' so that a hub-only pretrained_cfg cannot route the load to the Hugging Face hub
    overlay = {**(overlay or {}), "file": str(path), "source": ""}

    def create(kw: dict[str, Any]) -> nn.Module:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kw)

    try:
        with _capture_load_report() as report:
            try:
                model = create(kwargs)
            except TypeError as e:
                if "img_size" not in str(e) or "img_size" not in kwargs:
                    raise
                kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
                model = create(kwargs)
    except TypeError as e:  # raised while building the model, before any weight is read
        raise ConfigError(f"{arch_field}: timm model {arch!r} rejects its arguments {kwargs} ({e})") from e
    except Exception as e:  # unpickling, safetensors header, size mismatch in load_state_dict, bad geometry
        raise CheckpointError(
            f"{field}: cannot load {path} into {arch} with {kwargs} ({type(e).__name__}: {_short(e)}); check "
            f"that the file holds weights for this architecture and that the size kwargs are valid"
        ) from e
    problems = _load_problems(report, model, replaced_head=kwargs.get("num_classes", 0) != 0)
    if problems:
        raise CheckpointError(
            f"{field}: {path} does not match {arch} with {kwargs}: {'; '.join(problems)}. "
            f"Set the arch (and its size kwargs) the file was trained with"
        )
    return model


def pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """``model.pretrained_cfg``: the dict timm sets on every model it builds (typed; torch types it as a module)."""
    return cast(dict[str, Any], model.pretrained_cfg)


_LOAD_MSG = re.compile(r"^(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading", re.S)


def _load_problems(report: list[str], model: nn.Module, *, replaced_head: bool) -> list[str]:
    """Turn timm's load messages into problems; a new classifier's missing keys are expected."""
    classifiers = pretrained_cfg(model).get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
    problems = []
    for msg in report:
        match = _LOAD_MSG.match(msg)
        if match is None:
            problems.append(_short(msg))
            continue
        kind, keys = match.group(1).lower(), [k.strip() for k in match.group(2).split(",") if k.strip()]
        if kind == "missing" and replaced_head:
            keys = [k for k in keys if not k.startswith(prefixes)]
        if keys:
            problems.append(_short(f"{len(keys)} {kind} key(s): {', '.join(keys)}"))
    return problems


@contextlib.contextmanager
def _capture_load_report() -> Iterator[list[str]]:
    """Collect timm's "Missing keys"/"Unexpected keys" load messages (it logs them instead of raising)."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith(("Missing keys", "Unexpected keys")):
                messages.append(msg)

    logger = logging.getLogger(_TIMM_BUILDER_LOGGER)
    handler = _Handler(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _short(obj: object, limit: int = 400) -> str:
    text = str(obj)
    return text if len(text) <= limit else text[:limit] + " ..."


def check_arch(arch: str, field: str) -> None:
    """Raises ConfigError naming ``field`` when ``arch`` is not a timm model name."""
    if not timm.is_model(arch):
        raise ConfigError(f"{field}: {arch!r} is not a timm model name (see timm.list_models())")


def load_backbone(path: str | Path, **overrides: Any) -> nn.Module:
    """Load a backbone written by :func:`gfm_core.objectives.export_backbone`, using its JSON sidecar.

    Equivalent to ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path, ...),
    **timm_kwargs)``, with strict key checking; ``overrides`` replace sidecar kwargs (e.g. ``num_classes=10``,
    ``window_size=8``).
    """
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"{path}: sidecar {side.name} not found; export with gfm_core.objectives.export_backbone"
        )
    meta = read_json(side)
    if "weights_sha256" not in meta:  # export_backbone always records it; load_timm_weights checks it
        raise CheckpointError(
            f"{side}: no weights_sha256 for {path.name}; re-export the weights / re-run pretraining (gfm pretrain)"
        )
    try:
        arch, kwargs = meta["arch"], dict(meta["timm_kwargs"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{side}: missing 'arch'/'timm_kwargs' ({e})") from e
    kwargs.update(overrides)
    num_classes = kwargs.get("num_classes", 0)
    pcfg = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(meta.get("pretrained_cfg", {})).items()
    }
    model = load_timm_weights(arch, path, field=str(path), arch_field=f"{side}: arch", overlay=pcfg, **kwargs)
    if num_classes:  # timm drops nothing for a headless file; the new head keeps its random init
        _log.info("%s: new %d-class head is randomly initialised", path, num_classes)
    return model
