"""MLflow runs: the experiment, pipeline and stage runs, what is logged to them, and links to the UI."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gfm_core.config import TrackingCfg
from gfm_core.errors import ConfigError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PIPELINE_TAG = "gfm.pipeline_key"
_STATE: dict[str, str] = {}  # the experiment selected by configure()


def import_mlflow() -> Any:
    """The ``mlflow`` module, imported on first use (heavy; untracked stages never load it)."""
    import mlflow

    return mlflow


def configure(cfg: TrackingCfg) -> None:
    """Point MLflow at ``cfg.uri`` (creating the local store's folders) and select the experiment."""
    mlflow = import_mlflow()
    if cfg.uri.startswith("sqlite:///"):
        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_registry_uri(cfg.uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = None
        if not cfg.uri.startswith(("http://", "https://", "databricks")):  # a server picks its own store
            cfg.artifacts.mkdir(parents=True, exist_ok=True)
            location = cfg.artifacts.resolve().as_uri()
        with contextlib.suppress(Exception):  # created by a concurrent process in between
            mlflow.create_experiment(cfg.experiment, artifact_location=location)
    _STATE["experiment_id"] = mlflow.set_experiment(cfg.experiment).experiment_id


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


@contextlib.contextmanager
def pipeline_run(key: str, name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution, found by ``gfm.pipeline_key = key`` or created; yields its id.

    Each stage of a pipeline (possibly in another process) enters it again, so its stage runs nest under one
    parent. Two processes that create it at once both keep the oldest one.
    """
    mlflow = import_mlflow()
    client = mlflow.MlflowClient()
    exp_id = _STATE.get("experiment_id")
    if exp_id is None:
        raise ConfigError("pipeline_run: no MLflow experiment selected (call tracking.configure first)")

    def find() -> list[Any]:
        return client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'",
                                  order_by=["attributes.start_time ASC"], max_results=5)

    found = find()
    if not found:
        run = client.create_run(exp_id, run_name=name, tags={PIPELINE_TAG: key, "gfm.stage": "pipeline",
                                                                         **(tags or {})})
        found = find()
        if found and found[0].info.run_id != run.info.run_id:  # another process won the race: use its run
            client.delete_run(run.info.run_id)
    run_id = found[0].info.run_id if found else run.info.run_id
    with mlflow.start_run(run_id=run_id) as run:
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """An MLflow run for one stage (nested under the active pipeline run, if any); yields its run id."""
    mlflow = import_mlflow()
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, nested=nested, tags={"gfm.stage": name, **(tags or {})}) as run:
        flat = _flat("", params, {})
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i : i + 100]))
        yield run.info.run_id


def run_url(run_id: str, ui_url: str | None = None) -> str | None:
    """The MLflow UI page of a run: on the tracking server, or on ``ui_url`` (``mlflow ui`` on the local store)."""
    mlflow = import_mlflow()
    uri = mlflow.get_tracking_uri()
    base = uri if uri.startswith(("http://", "https://")) else ui_url
    if not base:
        return None
    exp_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def model_version_url(name: str, version: str, ui_url: str | None = None) -> str | None:
    """The MLflow UI page of a registered model version (see :func:`run_url`)."""
    uri = import_mlflow().get_tracking_uri()
    base = uri if uri.startswith(("http://", "https://")) else ui_url
    return f"{base.rstrip('/')}/#/models/{name}/versions/{version}" if base else None


class MlflowCallback:
    """``fit`` callback: every logged step's metrics go to the active MLflow run."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Log the step's finite metrics."""
        import_mlflow().log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Tag the run with the last checkpoint's path and step."""
        import_mlflow().set_tags({"gfm.last_checkpoint": str(path), "gfm.last_checkpoint_step": str(step)})


def callbacks() -> list[Any]:
    """``[MlflowCallback()]`` inside an active run, else none (stages run untracked outside one)."""
    with contextlib.suppress(ImportError):
        if import_mlflow().active_run() is not None:
            return [MlflowCallback()]
    return []


def log_metrics(metrics: Mapping[str, Any], prefix: str = "", step: int | None = None) -> None:
    """Finite numbers of ``metrics`` to the active run (at ``step``, if given)."""
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if clean and import_mlflow().active_run() is not None:
        import_mlflow().log_metrics(clean, step=step)


def log_artifacts(paths: Mapping[str, Path | None], artifact_path: str | None = None) -> None:
    """Log existing files or folders to the active run (missing ones are skipped; there is nothing to log)."""
    mlflow = import_mlflow()
    if mlflow.active_run() is None:
        return
    for path in paths.values():
        if path is None or not Path(path).exists():
            continue
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{Path(path).name}"
                                 if artifact_path else Path(path).name)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def git_sha() -> str:
    """The checkout's commit (``unknown`` outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"

