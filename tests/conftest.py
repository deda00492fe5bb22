"""Shared fixtures. Tests run offline on CPU; heavy libraries keep their caches inside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture
def store(tmp_path):
    """A real MLflow sqlite store + artifact folder in tmp_path, selected for gfm_core.tracking."""
    import mlflow

    from gfm_core import tracking
    from gfm_core.config import TrackingCfg

    tracking.configure(TrackingCfg(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=tmp_path / "artifacts",
                                   experiment="t"))
    yield tmp_path
    mlflow.set_tracking_uri(None)
