"""Fixtures of the Dagster tests: the demo data built once by its own asset, fresh copies per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import mlflow
import pytest
from dagster_params import resources, write_params

from orchestration import assets as A


@pytest.fixture(scope="session")
def demo_src(repo_root, tmp_path_factory) -> Path:
    """The demo data, built once by the ``demo_data`` asset (the folder holding ``demo/``)."""
    base = tmp_path_factory.mktemp("demo_src")
    path = write_params(repo_root, base)
    res = dg.materialize([A.demo_data], resources=resources(path))
    assert res.success
    meta = res.asset_materializations_for_node("demo_data")[0].metadata
    assert meta["pile_images"].value == 130 and "mlflow_run_id" in meta
    mlflow.set_tracking_uri(None)
    return base


@pytest.fixture
def workdir(demo_src, tmp_path) -> Path:
    """A fresh folder holding a copy of the demo data."""
    shutil.copytree(demo_src / "demo", tmp_path / "demo")
    yield tmp_path
    mlflow.set_tracking_uri(None)
