"""Load a script of ``benchmarks/`` as a module (the benchmarks are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def load_benchmark(repo_root: Path, monkeypatch: pytest.MonkeyPatch, name: str = "pretrain_step") -> ModuleType:
    """``benchmarks/<name>.py`` imported under ``name`` (registered in ``sys.modules`` for the test only:
    dataclasses look their module up there)."""
    path = repo_root / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
