"""The registered pyfunc model is self-contained: it loads and serves without gfm_core or the project's venv."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers.registry import tiny_backbone

from gfm_core import tracking

#: Run in a fresh interpreter (``python -I``, cwd outside the repo): gfm_core (the venv's editable install) and the
#: repo cannot be imported, then the logged model is loaded by MLflow and predicts.
LOAD_WITHOUT_GFM_CORE = """
import sys, importlib.abc
class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gfm_core", "orchestration", "helpers"):
            raise ModuleNotFoundError(f"{name} is kept out: the model must not need it", name=name)
sys.meta_path.insert(0, NoProject())
import mlflow.pyfunc, numpy as np
model_dir, x, out = sys.argv[1:4]
np.save(out, mlflow.pyfunc.load_model(model_dir).predict(np.load(x)))
assert not [m for m in sys.modules if m.split(".")[0] == "gfm_core"]
"""


def _logged_model(store: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Register a tiny backbone; return the downloaded model folder, an input batch and its expected features."""
    path, obj = tiny_backbone(store, 0)
    with tracking.stage_run("promote", {}):
        version = tracking.register_backbone(path, "gfm-foundation", {})
    local = Path(mlflow.artifacts.download_artifacts(f"models:/gfm-foundation/{version}", dst_path=str(store / "m")))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = obj.student.encoder.eval()(x).numpy()
    return local, x.numpy(), expected


def _pins(repo_root: Path) -> dict[str, str]:
    text = (repo_root / "pyproject.toml").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def test_the_logged_model_needs_neither_gfm_core_nor_the_repo(store, repo_root, tmp_path):
    model_dir, x, expected = _logged_model(store)
    reqs = dict(line.split("==") for line in (model_dir / "requirements.txt").read_text().split() if "==" in line)
    pins = _pins(repo_root)
    for pkg in ("torch", "torchvision", "timm", "mlflow"):  # what the model code imports, pinned as in pyproject
        assert reqs[pkg] == pins[pkg], (pkg, reqs)
    assert {"safetensors", "numpy"} <= set(reqs)
    np.save(tmp_path / "x.npy", x)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-c", LOAD_WITHOUT_GFM_CORE, str(model_dir), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)


def _local_wheels() -> list[str]:
    """``--find-links`` for this machine's local wheel folders, found as scripts/bootstrap.sh finds them."""
    args = []
    for key in ("global.find-links", "global.extra-index-url"):
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
        for item in got.stdout.split():
            folder = item if key.endswith("find-links") else re.sub(r"^file://(.*)/simple/*$", r"\1/files", item)
            if not folder.startswith(("http://", "https://")) and Path(folder).is_dir():
                args += ["--find-links", folder]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_from_an_env_built_from_the_models_requirements(store, tmp_path):
    """uv builds a venv from the logged model's requirements.txt alone; `mlflow models serve --env-manager local`
    from that venv, on 127.0.0.1, answers a [2, 3, 64, 64] request with the backbone's pooled features."""
    model_dir, x, expected = _logged_model(store)
    env_dir, elsewhere = tmp_path / "serve-env", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    uv = str(Path(sys.executable).parent / "uv")
    t0 = time.monotonic()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(env_dir)], check=True, env=env, cwd=elsewhere)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(env_dir / "bin" / "python"), *_local_wheels(),
                    "-r", str(model_dir / "requirements.txt")], check=True, env=env, cwd=elsewhere, timeout=1200)
    built = time.monotonic() - t0
    probe = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import gfm_core"], env=env, cwd=elsewhere,
                           capture_output=True)
    assert probe.returncode != 0  # the serving env has only what the model asks for

    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"  # activated, as --env-manager local expects
    port, log = _free_port(), tmp_path / "serve.log"
    cmd = [str(env_dir / "bin" / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=elsewhere,
                                start_new_session=True)
    try:
        body = json.dumps({"inputs": x.tolist()}).encode()
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, f"no answer in 600 s:\n{log.read_text()[-3000:]}"
                time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(env_dir, ignore_errors=True)  # gigabytes (mostly hard links into uv's cache)
    served = np.asarray(answer["predictions"], dtype=np.float32)
    assert served.shape == expected.shape == (2, 128)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    print(f"serving env built in {built:.0f} s; answered after {time.monotonic() - t0 - built:.0f} s")
