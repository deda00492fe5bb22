"""The assets in process with the real Dagster, the real stage functions, a real MLflow store in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest
import torch
import yaml
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver  # Dagster's own test helper
from dagster_params import resources, write_params
from helpers.rasters import make_photo

from gfm_core import tracking
from gfm_core.io import load_weights, sha256_file
from gfm_core.models.weights import load_backbone
from orchestration import assets as A
from orchestration.definitions import build_defs
from orchestration.resources import PretrainLauncher

UPSTREAM = [A.geopile_manifest, A.great_expectations_suite, A.geopile_shards, A.imagenet_teacher,
            A.foundation_model, A.ablation_models]


def _failure(res: dg.ExecuteInProcessResult) -> str:
    (event,) = res.get_step_failure_events()
    data = event.step_failure_data
    return (data.user_failure_data.description if data.user_failure_data else "") + data.error.message


def _client(tmp) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp}/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_blocking_check_stops_downstream_on_a_bad_pile(repo_root, workdir):
    path = write_params(repo_root, workdir, min_size=1000)  # no demo image is that large: the suite fails
    res = dg.materialize([A.geopile_manifest, A.great_expectations_suite, A.geopile_shards],
                         resources=resources(path), raise_on_error=False)
    (check,) = res.get_asset_check_evaluations()
    assert not check.passed and "min_size" in check.metadata["failed"].value
    assert "FAILED" in check.metadata["summary"].value
    done = {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert done == {"geopile_manifest"}  # the shards never ran
    assert not (workdir / "geopile" / "shards").exists()
    # the manifest's and the validation's MLflow runs nest under one parent run of this Dagster run
    runs = _client(workdir).search_runs(["1"], filter_string=f"tags.`dagster.run_id` = '{res.run_id}'")
    stages = {r.data.tags["gfm.stage"]: r for r in runs}
    assert set(stages) == {"pipeline", "ingest", "validate"}
    parent = stages["pipeline"].info.run_id
    assert stages["ingest"].data.tags["mlflow.parentRunId"] == parent
    assert stages["validate"].data.metrics["passed"] == 0.0
    assert stages["ingest"].data.metrics["accepted"] == 130


def test_shards_asset_refuses_a_verdict_of_the_previous_manifest(repo_root, workdir):
    """The Dagster path runs the same gate as `gfm shards`: a re-ingested pile needs a new validation."""
    from gfm_core import stages
    from gfm_core.config import load_params

    path = write_params(repo_root, workdir)
    params = load_params(path)
    stages.run_ingest(params, progress=False)
    assert stages.run_validate(params).success
    make_photo(workdir / "demo" / "pile" / "rmnp" / "extra.png", size=96, seed=3)  # the pile changes
    res = dg.materialize([A.geopile_manifest, A.geopile_shards], resources=resources(path), raise_on_error=False)
    done = {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert done == {"geopile_manifest"}
    message = _failure(res)
    assert f"{workdir / 'geopile' / 'validation' / 'validation.json'}: stale validation verdict" in message
    assert "run `gfm validate` first" in message
    assert not (workdir / "geopile" / "shards").exists()


def test_a_bad_params_key_fails_the_asset_naming_file_and_key(repo_root, workdir):
    path = write_params(repo_root, workdir, edit=lambda raw: raw["ingest"].update(max_bad_fracton=0.1))
    res = dg.materialize([A.geopile_manifest], resources=resources(path), raise_on_error=False)
    assert not res.success
    message = _failure(res)
    assert str(path) in message and "ingest.max_bad_fracton: unknown key" in message


def test_a_missing_teacher_fails_naming_the_key_and_file(repo_root, workdir):
    path = write_params(repo_root, workdir)
    (workdir / "demo" / "teacher" / "tf_efficientnet_lite0.safetensors").unlink()
    job = dg.define_asset_job("observe_teacher", selection=[A.imagenet_teacher])
    defs = dg.Definitions(assets=[A.imagenet_teacher], jobs=[job], resources=resources(path))
    res = defs.resolve_job_def("observe_teacher").execute_in_process(raise_on_error=False)
    assert not res.success
    assert "pretrain.teacher.checkpoint: teacher weight file" in _failure(res)
    assert "tf_efficientnet_lite0.safetensors not found" in _failure(res)


def test_whole_graph_materialises_registers_and_gates(repo_root, workdir):
    """Every asset, in job order; MLflow runs, lineage tags, @champion loading; a re-run candidate is refused."""
    tmp = workdir
    path = write_params(repo_root, tmp, models=("gfm",),  # the candidate alone: the first promotion passes
                        edit=lambda raw: raw["presets"]["demo"]["promote"].update(must_beat=[]))
    res_map = resources(path)
    defs = build_defs(str(path))

    up = dg.materialize(UPSTREAM, resources=res_map)
    assert up.success
    assert [c.passed for c in up.get_asset_check_evaluations()] == [True]
    meta = up.asset_materializations_for_node("foundation_model")[0].metadata
    assert meta["steps"].value == 2 and "final_loss" in meta and "| step |" in meta["loss_curve"].value
    client = _client(tmp)
    pre = client.get_run(meta["mlflow_run_id"].value)
    assert pre.data.tags["gfm.stage"] == "pretrain" and pre.data.params["student.arch"]
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "loss")] == [1, 2]  # per step
    flops = meta["compute.flops_per_step"].value  # the compute ledger: Dagster metadata and MLflow metrics
    assert flops > 0 and pre.data.metrics["compute.flops_per_step"] == flops
    assert pre.data.metrics["compute.co2_kg"] > 0 and meta["energy_source"].value
    assert meta["mlflow_run"].value.startswith("http://127.0.0.1:5000/#/experiments/")
    assert os.path.isfile(meta["reconstructions"].value)
    assert meta["reconstructions_image"].value.startswith("![reconstructions](data:image/png;base64,")
    assert "reconstructions.png" in {a.path for a in client.list_artifacts(pre.info.run_id)}

    finetuned, report, champion = (defs.get_assets_def(k) for k in
                                   ("finetuned_models", "evaluation_report", "champion_model"))
    for task in ("scene", "change"):
        ft = dg.materialize([finetuned], partition_key=task, resources=res_map)
        assert ft.success
        ft_meta = ft.asset_materializations_for_node("finetuned_models")[0].metadata
        assert "| model |" in ft_meta["results"].value and ft_meta["compute.co2_kg"].value > 0
    rep = dg.materialize([report], resources=res_map)
    rmeta = rep.asset_materializations_for_node("evaluation_report")[0].metadata
    assert rmeta["arp_gfm"].value == 0.0 and "| model |" in rmeta["report"].value.lower().replace("**", "")
    assert (tmp / "evaluate" / "radar.png").is_file()

    first = dg.materialize([champion], resources=res_map)
    cmeta = first.asset_materializations_for_node("champion_model")[0].metadata
    assert cmeta["registered"].value == "models:/gfm-foundation/1" and cmeta["promoted"].value is True
    (check,) = first.get_asset_check_evaluations()
    assert check.passed
    v1 = client.get_model_version("gfm-foundation", "1")
    lineage = ("gfm.data_manifest", "gfm.teacher", "gfm.teacher_sha256", "gfm.params_sha256", "gfm.git_sha",
               "gfm.weights_sha256", "gfm.dagster_run_id")
    assert all(k in v1.tags for k in lineage), sorted(v1.tags)
    assert v1.tags["gfm.dagster_run_id"] == first.run_id and v1.tags["gfm.gate"] == "passed"
    assert len(v1.tags["gfm.teacher_sha256"]) == 64
    assert "normalisation" in v1.description and "architecture" in v1.description  # the model card
    for section in ("intended_use", "wavelengths_um", "training_data", "compute", "co2", "evaluation",
                    "limitations"):  # Hugging Face / Clay card fields
        assert f"**{section}**" in v1.description, section

    # @champion loads the backbone: as timm (registry helper) and as an MLflow pyfunc
    tracking.configure(defs.resources["gfm"].load().tracking)
    model = tracking.load_registered_backbone("models:/gfm-foundation@champion").eval()
    local = load_backbone(tmp / "pretrain" / "backbone.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), local(x))
    feats = mlflow.pyfunc.load_model("models:/gfm-foundation@champion").predict(x.numpy())
    np.testing.assert_allclose(feats, local(x).detach().numpy(), rtol=1e-5, atol=1e-6)

    # the same model again is not better than the champion: refused, the alias stays on v1
    again = dg.materialize([champion], resources=res_map)
    ameta = again.asset_materializations_for_node("champion_model")[0].metadata
    assert ameta["promoted"].value is False and ameta["champion_before"].value == "1"
    (warn,) = again.get_asset_check_evaluations()
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == "1"
    v2 = client.get_model_version("gfm-foundation", "2")
    assert v2.tags["gfm.gate"] == "refused" and v2.tags["gfm.champion_before"] == "1"

    # one MLflow parent run per Dagster run, each stage a nested run
    parents = client.search_runs(["1"], filter_string="tags.`gfm.stage` = 'pipeline'")
    assert {p.data.tags["dagster.run_id"] for p in parents} >= {up.run_id, rep.run_id, first.run_id}
    children = client.search_runs(["1"], filter_string=f"tags.`dagster.run_id` = '{up.run_id}'")
    assert {r.data.tags["gfm.stage"] for r in children} >= {"pipeline", "ingest", "validate", "shards", "pretrain"}
    summary = json.loads((tmp / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 2


class _Crash:
    def __init__(self, at: int) -> None:
        self.at = at

    def on_log(self, step, metrics):
        if step == self.at:
            raise RuntimeError(f"simulated crash after step {step}")


class _CrashingLauncher(PretrainLauncher):
    """The in-process launcher, crashing after step ``crash_at`` was logged (between two checkpoints)."""

    crash_at: int

    def callbacks(self, context):
        return [*super().callbacks(context), _Crash(self.crash_at)]


def test_a_failed_pretraining_rematerialised_continues_its_last_checkpoint(repo_root, workdir):
    """Dagster re-materialisation after a crash at step 3 (last checkpoint: step 2) continues from step 2 and ends
    with the weights of an uninterrupted run; a finished run re-materialised starts over, setting the old aside."""
    def tiny(raw):  # 3 steps; a small teacher pool and held-out probe keep it quick
        raw["presets"]["demo"]["pretrain"].update(max_steps=3, teacher_pool=32, holdout_crops=8)

    path = write_params(repo_root, workdir, edit=tiny)
    raw = yaml.safe_load(path.read_text())
    raw["presets"]["demo"]["pretrain"]["out_dir"] = str(workdir / "reference")
    ref_path = workdir / "reference.yaml"
    ref_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert dg.materialize(UPSTREAM[:3], resources=resources(path)).success
    reference = dg.materialize([A.foundation_model], resources=resources(ref_path))
    assert reference.asset_materializations_for_node("foundation_model")[0].metadata["start_step"].value == 0

    crashing = {**resources(path), "launcher": _CrashingLauncher(crash_at=3)}
    failed = dg.materialize([A.foundation_model], resources=crashing, raise_on_error=False)
    (event,) = failed.get_step_failure_events()
    assert not failed.success and "simulated crash after step 3" in event.step_failure_data.error.to_string()
    ckpts = workdir / "pretrain" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002"]

    instance = dg.DagsterInstance.ephemeral()
    again = dg.materialize([A.foundation_model], resources=resources(path), instance=instance)
    meta = again.asset_materializations_for_node("foundation_model")[0].metadata
    assert meta["start_step"].value == 2 and meta["steps"].value == 3 and "set_aside" not in meta
    assert meta["start_reason"].value.startswith(f"resuming from {ckpts / 'step_000002'}")
    assert [m.step for m in _client(workdir).get_metric_history(meta["mlflow_run_id"].value, "loss")] == [3]
    assert any(e.user_message.startswith("resuming from") for e in instance.all_logs(again.run_id))  # run log
    a = load_weights(workdir / "reference" / "backbone.safetensors")
    b = load_weights(workdir / "pretrain" / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if it had never crashed
    steps = [int(line.split(",")[0]) for line in (workdir / "pretrain" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3]

    # the run finished: materialising it again trains anew and keeps the finished run's checkpoints aside
    fresh = dg.materialize([A.foundation_model], resources=resources(path))
    fmeta = fresh.asset_materializations_for_node("foundation_model")[0].metadata
    assert fmeta["start_step"].value == 0 and "finished (step 3 of 3)" in fmeta["start_reason"].value
    aside = Path(fmeta["set_aside"].value)
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_000002", "step_000003"]


@pytest.mark.slow
@pytest.mark.distributed
def test_pretraining_through_pipes_streams_metrics_back(repo_root, workdir):
    """torchrun through Dagster Pipes: same asset, Pipes log lines + messages, MLflow per-step metrics."""
    path = write_params(repo_root, workdir)
    res_map = resources(path)
    assert dg.materialize(UPSTREAM[:3], resources=res_map).success
    piped = resources(path, mode="torchrun", nproc_per_node=1)
    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize([A.foundation_model], resources=piped, instance=instance)
    assert res.success
    meta = res.asset_materializations_for_node("foundation_model")[0].metadata
    assert meta["steps"].value == 2 and "| 2 |" in meta["loss_curve"].value  # the steps came back by Pipes
    logs = [e.user_message for e in instance.all_logs(res.run_id)]
    assert any(m.startswith("launching through Dagster Pipes: ") and "torchrun" in m for m in logs)
    assert any(m.startswith("step 2: ") and " loss=" in m for m in logs)  # streamed by the launched rank 0
    client = _client(workdir)
    hist = client.get_metric_history(meta["mlflow_run_id"].value, "loss")
    assert [m.step for m in hist] == [1, 2]  # logged by the launched process into the asset's MLflow run


def test_materialize_command_fills_the_instance_the_ui_reads(repo_root, workdir):
    """``python -m orchestration.materialize`` (``make demo``): every asset and partition, as runs of $DAGSTER_HOME;
    the teacher's sha256 is pretraining's input data version, so a new teacher makes it stale."""
    path = write_params(repo_root, workdir, models=("gfm", "imagenet"))
    home = workdir / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "GFM_PARAMS": str(path)}
    out = subprocess.run([sys.executable, "-m", "orchestration.materialize"], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gfm_evaluate_and_promote: run" in out.stdout and "models:/gfm-foundation/1: promoted=" in out.stdout
    instance = dg.DagsterInstance.from_config(str(home))
    keys = {"demo_data", "geopile_manifest", "geopile_shards", "foundation_model", "ablation_models",
            "evaluation_report", "champion_model"}
    for key in keys:
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    parts = instance.get_materialized_partitions(dg.AssetKey("finetuned_models"))
    assert parts == {"scene", "change"}
    assert len(instance.get_runs()) == 6  # data, teacher observation, pretraining, two partitions, evaluate
    # pretraining recorded the teacher file's sha256 as its input data version ...
    teacher = workdir / "demo" / "teacher" / "tf_efficientnet_lite0.safetensors"
    sha = sha256_file(teacher)
    mat = instance.get_latest_materialization_event(dg.AssetKey("foundation_model")).asset_materialization
    assert mat.tags["dagster/input_data_version/imagenet_teacher"] == sha
    # ... so a new teacher (observed again) makes the foundation model stale, and only then
    defs = build_defs(str(path))
    status = get_stale_status_resolver(instance, defs.assets).get_status(dg.AssetKey("foundation_model"))
    assert status == StaleStatus.FRESH
    teacher.write_bytes(teacher.read_bytes() + b"\0")
    assert defs.resolve_job_def("observe_teacher").execute_in_process(instance=instance).success
    status = get_stale_status_resolver(instance, defs.assets).get_status(dg.AssetKey("foundation_model"))
    assert status == StaleStatus.STALE
    assert "ARP vs the ImageNet baseline: gfm " in out.stdout
    parents = _client(workdir).search_runs(["1"], filter_string="tags.`gfm.stage` = 'pipeline'")
    assert len(parents) == 1  # the four Dagster runs share one MLflow parent run (run tag gfm/pipeline)
    stages = _client(workdir).search_runs(["1"], filter_string="tags.`gfm.stage` != 'pipeline'")
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
