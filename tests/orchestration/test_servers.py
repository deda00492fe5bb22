"""The two UIs on loopback: ``dagster dev`` over our definitions, and an MLflow tracking server as the store.

Each server runs in its own process group on a free 127.0.0.1 port and is stopped (SIGTERM to the group,
SIGKILL after a grace period) whatever the test's outcome. In the default suite (about 15 s each on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import dagster_webserver
import mlflow
import pytest
from dagster_params import write_params
from helpers.registry import tiny_backbone

from gfm_core import registry, tracking
from gfm_core.config import PromoteCfg, TrackingCfg
from gfm_core.io import sha256_file

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.distributed  # several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        time.sleep(1)  # children (code server, daemon, job runner) leave with the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _get(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0, data: bytes | None = None) -> bytes:
    """The body of ``url`` once the server answers (fails early, with its log, if it dies)."""
    deadline = time.monotonic() + timeout
    headers = {"Content-Type": "application/json"} if data else {}
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    home = tmp / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(home), "HOME": str(tmp), "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1", **extra}


def test_dagster_dev_serves_the_graph_on_loopback(repo_root, tmp_path):
    params = write_params(repo_root, tmp_path)
    port = _free_port()
    log = tmp_path / "dagster.log"
    cmd = [str(BIN / "dagster"), "dev", "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)]
    with _server(cmd, log, _env(tmp_path, GFM_PARAMS=str(params)), repo_root) as proc:
        info = json.loads(_get(f"http://127.0.0.1:{port}/server_info", proc, log))
        assert info["dagster_webserver_version"] == dagster_webserver.__version__
        query = """{
          assetNodes { assetKey { path } isPartitioned }
          repositoriesOrError { ... on RepositoryConnection { nodes {
            jobs { name } sensors { name } schedules { name cronSchedule } } } }
        }"""
        body = _get(f"http://127.0.0.1:{port}/graphql", proc, log, data=json.dumps({"query": query}).encode())
        data = json.loads(body)["data"]
        nodes = {n["assetKey"]["path"][0]: n["isPartitioned"] for n in data["assetNodes"]}
        assert nodes["finetuned_models"] is True and nodes["champion_model"] is False
        assert {"geopile_manifest", "foundation_model", "imagenet_teacher", "evaluation_report"} <= set(nodes)
        (repo,) = data["repositoriesOrError"]["nodes"]
        assert {"retrain", "gfm_foundation"} <= {j["name"] for j in repo["jobs"]}
        assert "new_teacher_sensor" in {s["name"] for s in repo["sensors"]}
        assert repo["schedules"] == [{"name": "retrain_schedule", "cronSchedule": "0 3 * * 0"}]
    assert proc.returncode is not None


def test_mlflow_server_is_one_setting_away(tmp_path):
    port = _free_port()
    log = tmp_path / "mlflow.log"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--default-artifact-root", (tmp_path / "server_artifacts").as_uri(), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with _server(cmd, log, _env(tmp_path), tmp_path) as proc:
        assert _get(f"{uri}/health", proc, log) == b"OK"
        try:
            tracking.configure(TrackingCfg(uri=uri, experiment="through-server"))
            with tracking.stage_run("pretrain", {"pretrain": {"alpha": 1.0}}) as run_id:
                tracking.callbacks()[0].on_log(1, {"loss": 0.5})
            assert tracking.run_url(run_id) == f"{uri}/#/experiments/1/runs/{run_id}"
            # promotion through the server: the server accepts the promotion ticket (a ledger model version)
            backbone, _ = tiny_backbone(tmp_path, 0)
            with tracking.stage_run("promote", {}):
                version = tracking.register_backbone(backbone, "gfm-foundation", {})
                report = SimpleNamespace(arp={"gfm": 1.0, "imagenet": 0.0}, missing=[],
                                         backbones={"gfm": sha256_file(backbone)})
                assert tracking.promote(version, report, PromoteCfg()).promoted
            client = mlflow.MlflowClient()
            assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == version
            (ticket,) = client.search_model_versions(f"name = 'gfm-foundation{registry.LEDGER_SUFFIX}'")
            assert ticket.tags[registry.TICKET_TAG] == "done" and ticket.tags["gfm.ticket_outcome"] == "done"
        finally:
            mlflow.set_tracking_uri(None)
        found = json.loads(_get(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=through-server",
                                proc, log))
        assert found["experiment"]["name"] == "through-server"
        run = json.loads(_get(f"{uri}/api/2.0/mlflow/runs/get?run_id={run_id}", proc, log))["run"]
        assert run["data"]["metrics"][0]["key"] == "loss" and run["data"]["params"][0]["value"] == "1.0"
    assert proc.returncode is not None
