"""DVC pipeline: the stages are real `gfm` subcommands, and `dvc repro` runs, caches, re-runs and restores.

Remotes: a local folder (the repo's default) and S3 through dvc-s3, against moto's S3 HTTP server on
127.0.0.1 (a real S3 API over loopback; nothing is mocked inside DVC or botocore).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from gfm_core.cli import COMMANDS
from gfm_core.config import load_params
from gfm_core.io import sha256_file
from gfm_core.stages import dvc_lineage

VENV_BIN = Path(sys.executable).parent
TASKS = ("scene", "multilabel", "segmentation", "change", "superres")


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


S3_KEY, S3_SECRET = "gfm-test-key", "gfm-test-secret"


@pytest.fixture
def moto_s3():
    """moto's S3 server on 127.0.0.1 (free port) with a fresh, empty bucket: (endpoint_url, boto3 client, bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
        )
        bucket = f"gfm-dvc-{uuid.uuid4().hex[:8]}"  # moto's backend is per process: never reuse a bucket
        client.create_bucket(Bucket=bucket)
        yield endpoint, client, bucket
    finally:
        server.stop()


def _s3_keys(client, bucket) -> dict[str, int]:
    keys, token = {}, None
    while True:
        page = client.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _offline_env(tmp_path, **extra):
    """The venv's dvc on PATH, git identity, and no AWS/DVC settings from the machine (~/.aws, global configs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(tmp_path / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(tmp_path / "dvc-system"),
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        **extra,
    )
    return env


def _md5_key(dvc_file: Path, prefix: str) -> str:
    md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    return f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"


def test_dvc_push_pull_s3_remote_on_moto(moto_s3, tmp_path):
    """`dvc add` data + weights, push to an S3 remote configured as a user would, restore in a fresh clone."""
    from safetensors.numpy import load_file, save_file

    endpoint, s3, bucket = moto_s3
    env = _offline_env(tmp_path)  # credentials come from .dvc/config.local here, from the environment in the clone
    dvc = str(VENV_BIN / "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    (repo / "data" / "pile").mkdir(parents=True)
    (repo / "data" / "pile" / "tiles.csv").write_text("tile,source\n0,landsat\n1,neon\n")
    (repo / "data" / "pile" / "tile0.bin").write_bytes(np.random.default_rng(1).bytes(50_000))
    weights = repo / "backbone.safetensors"
    tensors = {"patch_embed.weight": np.random.default_rng(0).standard_normal((32, 4, 4, 4)).astype(np.float32)}
    save_file(tensors, str(weights), metadata={"arch": "swin"})
    _run([dvc, "add", "data", "backbone.safetensors"], repo, env)

    _run([dvc, "remote", "add", "-d", "s3remote", f"s3://{bucket}/gfm"], repo, env)
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", endpoint], repo, env)
    _run([dvc, "remote", "modify", "--local", "s3remote", "access_key_id", S3_KEY], repo, env)
    _run([dvc, "remote", "modify", "--local", "s3remote", "secret_access_key", S3_SECRET], repo, env)
    _run(["git", "add", "."], repo, env)
    _run(["git", "commit", "-qm", "data, weights and an S3 remote"], repo, env)
    tracked = _run(["git", "ls-files"], repo, env).split()
    assert {".dvc/config", "data.dvc", "backbone.safetensors.dvc"} <= set(tracked)
    assert ".dvc/config.local" not in tracked and "backbone.safetensors" not in tracked
    assert S3_SECRET not in (repo / ".dvc" / "config").read_text()
    assert S3_SECRET in (repo / ".dvc" / "config.local").read_text()

    assert _s3_keys(s3, bucket) == {}
    assert "new:" in _run([dvc, "status", "-c"], repo, env)  # the remote lacks what the cache has
    assert "4 files pushed" in _run([dvc, "push"], repo, env)  # 2 data files, the data/ listing, the weights
    keys = _s3_keys(s3, bucket)
    assert len(keys) == 4 and all(k.startswith("gfm/files/md5/") for k in keys), keys
    weights_key = _md5_key(repo / "backbone.safetensors.dvc", "gfm")
    assert s3.get_object(Bucket=bucket, Key=weights_key)["Body"].read() == weights.read_bytes()

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "backbone.safetensors").exists() and not (clone / "data").exists()
    assert not (clone / ".dvc" / "config.local").exists()
    denied = subprocess.run([dvc, "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert denied.returncode != 0 and "Unable to locate credentials" in denied.stdout + denied.stderr
    assert not (clone / "backbone.safetensors").exists()
    creds = _offline_env(tmp_path, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    _run([dvc, "pull"], clone, creds)
    for rel in ("backbone.safetensors", "data/pile/tiles.csv", "data/pile/tile0.bin"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    np.testing.assert_array_equal(
        load_file(str(clone / "backbone.safetensors"))["patch_embed.weight"], tensors["patch_embed.weight"]
    )
    assert "in sync" in _run([dvc, "status", "-c"], clone, creds)


@pytest.mark.slow
def test_dvc_repro_cache_rerun_push_pull(repo_root, tmp_path, moto_s3):
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True)
    for rel in files.stdout.splitlines():
        if (repo_root / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / rel, repo / rel)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["presets"]["demo"]["pretrain"].update(batch_size=4, max_steps=4, log_every=2, checkpoint_every=2,
                                                 teacher_pool=32, holdout_crops=8)
    params["presets"]["demo"]["finetune"].update(seeds=[0], epochs=1, warmup_epochs=0,  # 5 tasks x 3 models x 1
                                                 log_every=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    dvc = str(VENV_BIN / "dvc")
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([dvc, "remote", "modify", "local", "url", str(tmp_path / "remote")], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)

    # the whole demo pipeline: every stage of dvc.yaml runs once
    first = _run([dvc, "repro"], repo, env)
    everything = ["demo_data", "ingest", "validate", "shards", "pretrain", *(f"finetune@{t}" for t in TASKS),
                  "evaluate"]
    for stage in everything:
        assert f"Running stage '{stage}'" in first, stage
    weights = repo / "outputs" / "pretrain" / "backbone.safetensors"
    assert weights.is_file() and (repo / "outputs" / "evaluate" / "report.json").is_file()
    assert (repo / "outputs" / "pretrain" / "reconstructions.png").is_file()  # a plot of the pretrain stage
    # the registry's lineage names the DVC run that made these weights
    assert dvc_lineage(weights, repo / "dvc.lock") == {
        "gfm.dvc_lock_sha256": sha256_file(repo / "dvc.lock"), "gfm.dvc_stage": "pretrain"}

    again = _run([dvc, "repro"], repo, env)
    assert "Running stage" not in again and "up to date" in again

    params["pretrain"]["alpha"] = 0.5  # pretraining and what is downstream of it, nothing upstream
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([dvc, "repro"], repo, env)
    for stage in ("pretrain", *(f"finetune@{t}" for t in TASKS), "evaluate"):
        assert f"Running stage '{stage}'" in third, stage
    for stage in ("demo_data", "ingest", "validate", "shards"):
        assert f"Running stage '{stage}'" not in third, stage
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
    _run([dvc, "pull"], clone, env)  # a full repro: every output is in dvc.lock
    assert (clone / "outputs" / "pretrain" / "backbone.safetensors").read_bytes() == weights.read_bytes()
    assert (clone / "outputs" / "evaluate" / "radar.png").read_bytes() == (
        repo / "outputs" / "evaluate" / "radar.png").read_bytes()

    # the same outputs through an S3 remote (moto on loopback): every object of the local remote lands there
    endpoint, s3, bucket = moto_s3
    s3_env = _offline_env(tmp_path, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    _run([dvc, "remote", "add", "s3remote", f"s3://{bucket}/gfm"], repo, s3_env)
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", endpoint], repo, s3_env)
    _run(["git", "commit", "-qam", "S3 remote"], repo, s3_env)
    _run([dvc, "push", "-r", "s3remote"], repo, s3_env)
    local = {p.relative_to(tmp_path / "remote").as_posix() for p in (tmp_path / "remote").rglob("*") if p.is_file()}
    assert local and set(_s3_keys(s3, bucket)) == {f"gfm/{rel}" for rel in local}
    clone_s3 = tmp_path / "clone-s3"
    _run(["git", "clone", "-q", str(repo), str(clone_s3)], tmp_path, s3_env)
    _run([dvc, "pull", "-r", "s3remote"], clone_s3, s3_env)
    for rel in ("outputs/pretrain/backbone.safetensors", "outputs/geopile/manifest.parquet"):
        assert (clone_s3 / rel).read_bytes() == (repo / rel).read_bytes(), rel
