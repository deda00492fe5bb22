"""``-S key=value`` overrides (the syntax of ``dvc exp run -S``), applied to the raw params before validation.

A key is a dotted path into the params mapping (``finetune.epochs``); a segment that meets a list picks an
element by index (``finetune.seeds.0``) or, for lists of named mappings, by its ``name``
(``finetune.tasks.scene.epochs``). The value is YAML (``5``, ``0.1``, ``null``, ``[0, 1]``, ``{alpha: 0}``, a bare
string). The result is validated like the params file, so a wrong key or value fails naming it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from gfm_core.errors import ConfigError


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> ``(["a", "b"], 1)``.

    Raises:
        ConfigError: no ``=``, an empty key segment, or a value that is not YAML.
    """
    key, sep, text = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"-S {item!r}: expected key=value with a dotted key (e.g. finetune.epochs=5)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"-S {item!r}: the value is not valid YAML: {e}") from None
    return path, value


def _child(node: Any, seg: str, item: str, where: str) -> Any:
    """The element ``seg`` of a list ``node``: by index, or the mapping whose ``name`` is ``seg``."""
    if seg.lstrip("-").isdigit():
        i = int(seg)
        if not -len(node) <= i < len(node):
            raise ConfigError(f"-S {item!r}: {where} has {len(node)} element(s), no index {i}")
        return i
    names = [e.get("name") for e in node if isinstance(e, dict)]
    if seg not in names:
        raise ConfigError(f"-S {item!r}: {where} has no element named {seg!r} (names: {names or 'none'})")
    return names.index(seg)


def apply_sets(raw: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with every ``key=value`` of ``items`` set, in order (module docstring).

    Missing mapping keys are created (validation then rejects unknown ones by name).

    Raises:
        ConfigError: a malformed item, or a path through a scalar or a missing list element.
    """
    out = copy.deepcopy(raw)
    for item in items:
        path, value = parse_set(item)
        node: Any = out
        for depth, seg in enumerate(path):
            where = ".".join(path[:depth]) or "params"
            last = depth == len(path) - 1
            if isinstance(node, list):
                key: Any = _child(node, seg, item, where)
            elif isinstance(node, dict):
                key = seg
                if not last and node.get(seg) is None:
                    node[seg] = {}
            else:
                raise ConfigError(f"-S {item!r}: {where} is a value ({node!r}), not a mapping or list")
            if last:
                node[key] = value
            else:
                node = node[key]
    return out
