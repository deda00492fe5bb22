"""The Dagster definitions: what they hold, what they import, and how resources are swapped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
from dagster_params import write_params

from orchestration.assets import PRETRAIN_POOL
from orchestration.definitions import build_defs
from orchestration.resources import GfmParams, MlflowTracking, PretrainLauncher


def test_definitions_hold_the_stage_assets_jobs_schedule_sensor_and_partitions(repo_root, tmp_path):
    path = write_params(repo_root, tmp_path)
    defs = build_defs(str(path))
    repo = defs.get_repository_def()
    assert {"gfm_foundation", "gfm_finetune", "gfm_evaluate_and_promote", "retrain", "gfm_science",
            "embed_scenes"} <= set(repo.job_names)
    assert [k.to_user_string() for k in repo.get_job("gfm_science").asset_layer.executable_asset_keys] == [
        "science_report"]  # the experiment runs on its own, never inside the demo's jobs
    foundation = {k.to_user_string() for k in repo.get_job("gfm_foundation").asset_layer.executable_asset_keys}
    assert not {"science_report", "scene_embeddings"} & foundation
    assert repo.get_schedule_def("retrain_schedule").cron_schedule == "0 3 * * 0"
    assert repo.has_sensor_def("new_teacher_sensor")
    running = {s.name for s in repo.sensor_defs if s.default_status == dg.DefaultSensorStatus.RUNNING}
    assert running == {"new_teacher_sensor", "gfm_automation", "scene_sensor"}  # retraining needs only the daemon
    graph = repo.asset_graph
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"demo_data", "geopile_manifest", "geopile_shards", "imagenet_teacher", "foundation_model",
                    "ablation_models", "finetuned_models", "evaluation_report", "champion_model", "science_report",
                    "scene_embeddings"}
    assert graph.get(dg.AssetKey("finetuned_models")).partitions_def.get_partition_keys() == ["scene", "change"]
    assert graph.get(dg.AssetKey("imagenet_teacher")).is_observable
    scene = graph.get(dg.AssetKey("scene_embeddings"))  # on demand: a partition per scene file, no automation
    assert scene.partitions_def == dg.DynamicPartitionsDefinition(name="scenes") and scene.automation_condition is None
    checks = {c.name: c for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"great_expectations_suite", "candidate_promoted"} <= set(checks)
    blocking = [s for a in (*defs.assets, *defs.asset_checks) if isinstance(a, dg.AssetsDefinition)
                for s in a.check_specs if s.blocking]
    assert [s.name for s in blocking] == ["great_expectations_suite"]
    for key in ("finetuned_models", "evaluation_report", "champion_model"):  # follow a retraining by themselves
        assert graph.get(dg.AssetKey(key)).automation_condition is not None
    assert set(defs.resources) == {"gfm", "mlflow", "launcher"}


def test_the_module_loads_from_the_environment_without_torch_or_mlflow(repo_root, tmp_path):
    path = write_params(repo_root, tmp_path)
    code = ("import sys, orchestration.definitions as d\n"
            "print(sorted(m for m in ('torch', 'timm', 'mlflow') if m in sys.modules))\n"
            "print(d.defs.get_repository_def().asset_graph.get(d.dg.AssetKey('finetuned_models'))"
            ".partitions_def.get_partition_keys())\n")
    env = {"GFM_PARAMS": str(path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "['scene', 'change']"], out.stderr


def test_resources_swap_teacher_and_tracking(repo_root, tmp_path):
    path = write_params(repo_root, tmp_path)
    gfm = GfmParams(params_path=str(path))
    assert gfm.for_run({}) is gfm
    new = gfm.for_run({"gfm/teacher_file": "/w/t.safetensors", "gfm/teacher_arch": "resnet50"}).load()
    assert new.pretrain.teacher.checkpoint == Path("/w/t.safetensors") and new.pretrain.teacher.arch == "resnet50"
    # the ImageNet baseline is the teacher in force: it follows the override (params data, validated again)
    assert (new.model("imagenet").path, new.model("imagenet").arch) == (Path("/w/t.safetensors"), "resnet50")
    assert gfm.load().pretrain.teacher.arch == "tf_efficientnet_lite0"
    server = MlflowTracking(tracking_uri="http://127.0.0.1:5999", experiment="other").apply(gfm.load())
    assert (server.tracking.uri, server.tracking.experiment) == ("http://127.0.0.1:5999", "other")
    assert MlflowTracking().apply(gfm.load()).tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_launcher_commands_run_the_pipes_entry_point(repo_root, tmp_path):
    path = write_params(repo_root, tmp_path)
    gfm = GfmParams(params_path=str(path), teacher_checkpoint="/w/new.pth")
    torchrun = PretrainLauncher(mode="torchrun", nproc_per_node=8, extra_args=["--nnodes=2"]).command(gfm)
    assert Path(torchrun[0]).name == "torchrun" and torchrun[1:3] == ["--nproc_per_node=8", "--nnodes=2"]
    assert torchrun[3:] == ["-m", "orchestration.pipes_pretrain", "--params", str(path),
                            "--teacher-checkpoint", "/w/new.pth"]
    ds = PretrainLauncher(mode="deepspeed", nproc_per_node=4).command(GfmParams(params_path="p.yaml"),
                                                                      ablation="mim_only")
    assert Path(ds[0]).name == "deepspeed" and ds[1:4] == ["--num_gpus=4", "--no_local_rank", "--module"]
    assert ds[4:] == ["orchestration.pipes_pretrain", "--params", "p.yaml", "--ablation", "mim_only"]
    one = PretrainLauncher(mode="subprocess").command(GfmParams(params_path="p.yaml", preset="demo"))
    assert one == [sys.executable, "-m", "orchestration.pipes_pretrain", "--params", "p.yaml", "--preset", "demo"]


def test_pretrainings_share_one_pool_limited_to_one_at_a_time(repo_root, tmp_path):
    """Runs of a pretraining asset never overlap: both pretraining assets are in the pool gfm_pretrain, and the
    instance settings `make env` installs limit every pool to 1 (gfm_core's out_dir lock backs this up)."""
    graph = build_defs(str(write_params(repo_root, tmp_path))).resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys() if graph.get(k).pools}
    assert pools == {"foundation_model": {PRETRAIN_POOL}, "ablation_models": {PRETRAIN_POOL}}
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(repo_root / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    makefile = (repo_root / "Makefile").read_text()
    assert 'cp orchestration/dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"' in makefile


def test_the_project_root_is_a_dagster_project(repo_root):
    """`dagster dev` / `dagster definitions validate` find the code location from pyproject, without -m."""
    env_bin = Path(sys.executable).parent
    out = subprocess.run([str(env_bin / "dagster"), "definitions", "validate"], cwd=repo_root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful for code location gfm-pipeline" in out.stdout + out.stderr
