"""Whole scenes on demand: the scene sensor adds partitions, one partition materialises one scene's GeoParquet."""

from __future__ import annotations

import json

import dagster as dg
import mlflow
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.rasters import make_geotiff
from helpers.registry import tiny_backbone

from gfm_core.config import load_params
from orchestration import scenes
from orchestration.resources import GfmParams, MlflowTracking


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path, _ = tiny_backbone(tmp_path_factory.mktemp("bb"), 0)  # a 64 px Swin: 3 x 3 tiles on 150 x 170
    return path


def _params(tmp_path, model, **inference):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifacts": str(tmp_path / "mlartifacts")},
        "inference": {"scenes_dir": str(tmp_path / "scenes"), "out_dir": str(tmp_path / "emb"), "model": str(model),
                      "device": "cpu", "batch_size": 4, **inference},
    }))
    return path


def _scenes(tmp_path):
    make_geotiff(tmp_path / "scenes" / "a.tif", size=(150, 170), seed=1)
    make_geotiff(tmp_path / "scenes" / "2026" / "b.tiff", size=(64, 64), seed=2)
    (tmp_path / "scenes" / "notes.txt").write_text("not a scene")


def _resources(path):
    return {"gfm": GfmParams(params_path=str(path)), "mlflow": MlflowTracking()}


def test_sensor_adds_scenes_then_one_partition_materialises_one_scene(tmp_path, backbone):
    path = _params(tmp_path, backbone)
    _scenes(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    sensor = scenes.build_scene_sensor(lambda: load_params(path))
    tick = sensor(dg.build_sensor_context(instance=instance))
    (add,) = tick.dynamic_partitions_requests
    assert add.partitions_def_name == "scenes" and list(add.partition_keys) == ["2026/b.tiff", "a.tif"]
    assert tick.run_requests == []  # partitions only: nothing runs until asked
    instance.add_dynamic_partitions("scenes", list(add.partition_keys))
    again = sensor(dg.build_sensor_context(instance=instance))
    assert not again.dynamic_partitions_requests and "no new scene" in again.skip_reason.skip_message

    res = dg.materialize([scenes.scene_embeddings], partition_key="a.tif", instance=instance,
                         resources=_resources(path))
    assert res.success
    meta = res.asset_materializations_for_node("scene_embeddings")[0].metadata
    out = tmp_path / "emb" / "a.parquet"
    table = pq.read_table(out)
    assert meta["path"].value == str(out) and meta["rows"].value == table.num_rows == 9
    assert meta["tiles_per_second"].value > 0 and meta["model"].value == str(backbone)
    assert meta["model_version"].value == "(not registered)"
    gfm = json.loads(table.schema.metadata[b"gfm"])
    assert gfm["scene"] == str(tmp_path / "scenes" / "a.tif") and gfm["weights_sha256"] == meta["weights_sha256"].value
    assert gfm["bands"] == [1, 2, 3] and gfm["value_range"] == [0, 255]  # the defaults: file order, by dtype
    key = dg.AssetKey("scene_embeddings")
    assert instance.get_materialized_partitions(key) == {"a.tif"}  # the other scene waits for its own request
    assert not (tmp_path / "emb" / "2026").exists()


def test_a_vanished_scene_fails_by_name_and_keys_cannot_leave_the_folder(tmp_path, backbone):
    path = _params(tmp_path, backbone)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("scenes", ["gone.tif", "../params.yaml"])
    for key, why in (("gone.tif", "scene 'gone.tif' not found under inference.scenes_dir"),
                     ("../params.yaml", "without '..'")):
        res = dg.materialize([scenes.scene_embeddings], partition_key=key, instance=instance,
                             resources=_resources(path), raise_on_error=False)
        (failure,) = res.get_step_failure_events()
        assert not res.success and why in failure.step_failure_data.user_failure_data.description


def test_the_command_embeds_new_scenes_with_the_registry_champion(tmp_path, backbone, capsys, monkeypatch):
    from gfm_core import tracking

    path = _params(tmp_path, "models:/gfm-foundation@champion", bands=[3, 2, 1], value_range=[0, 200])
    _scenes(tmp_path)
    tracking.configure(load_params(path).tracking)
    with tracking.stage_run("promote", {"seed": 1}):
        version = tracking.register_backbone(backbone, "gfm-foundation", {})
    mlflow.MlflowClient().set_registered_model_alias("gfm-foundation", "champion", version)
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # an ephemeral instance
    assert scenes.main(["2026/b.tiff", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2026/b.tiff: 1 rows" in out and str(tmp_path / "emb" / "2026" / "b.parquet") in out
    gfm = json.loads(pq.read_schema(tmp_path / "emb" / "2026" / "b.parquet").metadata[b"gfm"])
    assert gfm["model_uri"] == "models:/gfm-foundation@champion" and gfm["model_version"] == version
    assert gfm["bands"] == [3, 2, 1] and gfm["value_range"] == [0, 200]
    assert not (tmp_path / "emb" / "a.parquet").exists()
    mlflow.set_tracking_uri(None)
