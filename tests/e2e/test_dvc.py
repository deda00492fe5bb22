"""DVC pipeline: the stages are real `gfm` subcommands, and `dvc repro` runs, caches, re-runs and restores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gfm_core.cli import COMMANDS
from gfm_core.config import load_params

VENV_BIN = Path(sys.executable).parent


def test_every_stage_is_a_gfm_command_with_real_params(repo_root):
    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    load_params(repo_root / "params.yaml")  # the file the stages read is valid
    for name, stage in spec["stages"].items():
        stage = stage.get("do", stage)  # foreach stages keep their body under `do`
        argv = stage["cmd"].split()
        assert argv[0] == "gfm" and argv[1] in COMMANDS, name
        assert name.startswith(argv[1].replace("-", "_")), f"stage {name} must run `gfm {name.replace('_', '-')}`"
        for key in stage["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in params.yaml"
                node = node[part]
        for dep in stage.get("deps", []):
            if not dep.startswith(("data/", "outputs/")) and "${" not in dep:
                assert (repo_root / dep).exists(), f"{name}: dependency {dep} does not exist"


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_dvc_repro_cache_rerun_push_pull(repo_root, tmp_path):
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True)
    for rel in files.stdout.splitlines():
        if (repo_root / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / rel, repo / rel)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["presets"]["demo"]["pretrain"].update(batch_size=4, max_steps=4, log_every=2, checkpoint_every=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    dvc = str(VENV_BIN / "dvc")
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "remote", "modify", "local", "url", str(tmp_path / "remote")], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)

    # the pipeline up to the foundation model (finetune/evaluate run 45 fine-tunings: too long for a test)
    first = _run([dvc, "repro", "pretrain"], repo, env)
    for stage in ("demo_data", "ingest", "pretrain"):
        assert f"Running stage '{stage}'" in first
    weights = repo / "outputs" / "pretrain" / "backbone.safetensors"
    assert weights.is_file()

    again = _run([dvc, "repro", "pretrain"], repo, env)
    assert "Running stage" not in again and "up to date" in again

    params["pretrain"]["alpha"] = 0.5  # only pretraining depends on it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([dvc, "repro", "pretrain"], repo, env)
    assert "Running stage 'pretrain'" in third
    assert "Running stage 'demo_data'" not in third and "Running stage 'ingest'" not in third
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "alpha 0.5"], repo, env)

    exp = _run([dvc, "exp", "run", "-S", "pretrain.alpha=0", "-n", "mim-only", "pretrain"], repo, env)
    assert "Running stage 'pretrain'" in exp and "Running stage 'ingest'" not in exp
    shown = _run([dvc, "exp", "show", "--no-pager", "--csv"], repo, env)
    assert "mim-only" in shown
    # the experiment left its params, lock and weights in the workspace; go back to the committed run
    _run(["git", "checkout", "--", "."], repo, env)
    _run([dvc, "checkout", "--force"], repo, env)

    _run([dvc, "push"], repo, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    _run([dvc, "pull"], clone, env)
    assert (clone / "outputs" / "pretrain" / "backbone.safetensors").read_bytes() == weights.read_bytes()
