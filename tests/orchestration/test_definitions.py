"""The Dagster layer, in process, over the real stage functions and the real demo data (tiny budgets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from gfm_core.errors import ConfigError
from orchestration import assets as A
from orchestration.definitions import build_defs, scan_teachers
from orchestration.resources import GfmParams, PretrainLauncher


def _write_params(repo_root: Path, tmp: Path, **validate) -> Path:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["demo_data"]["root"] = str(tmp / "demo")
    raw["retrain"]["teacher_dir"] = str(tmp / "teachers")
    raw["tracking"].update(uri=f"sqlite:///{tmp}/mlflow.db", artifacts=str(tmp / "mlartifacts"))
    demo = raw["presets"]["demo"]
    demo["ingest"].update(root=str(tmp / "demo" / "pile"), out_dir=str(tmp / "geopile"))
    demo["validate"].update(validate)
    demo["pretrain"]["teacher"]["checkpoint"] = str(tmp / "demo" / "teacher" / "tf_efficientnet_lite0.safetensors")
    demo["pretrain"].update(out_dir=str(tmp / "pretrain"), batch_size=4, max_steps=2, log_every=1, checkpoint_every=2)
    ft = demo["finetune"]
    ft["tasks"] = [t for t in ft["tasks"] if t["name"] in ("scene", "change")]
    for task in ft["tasks"]:
        task["root"] = str(tmp / "demo" / "tasks" / task["name"])
    for m in ft["models"]:
        if m["kind"] == "export":
            m["path"] = str(tmp / f"pretrain_{m['name']}" / "backbone.safetensors")
        if m.get("pretrain"):
            m["pretrain"]["out_dir"] = str(tmp / f"pretrain_{m['name']}")
    ft["models"][0]["path"] = str(tmp / "pretrain" / "backbone.safetensors")  # gfm
    ft["models"][1]["path"] = demo["pretrain"]["teacher"]["checkpoint"]  # imagenet
    ft.update(seeds=[0], epochs=1, out_dir=str(tmp / "finetune"))
    demo["evaluate"].update(n_bootstrap=20, out_dir=str(tmp / "evaluate"))
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dagster")
    path = _write_params(repo_root, tmp)
    resources = {"gfm": GfmParams(params_path=str(path)), "launcher": PretrainLauncher()}
    assert dg.materialize([A.demo_data], resources=resources).success
    return tmp, path, resources


def test_definitions_load_with_jobs_schedule_sensor_and_partitions(tiny):
    _, path, _ = tiny
    defs = build_defs(str(path))
    repo = defs.get_repository_def()
    assert {"gfm_foundation", "gfm_finetune", "gfm_evaluate_and_promote", "retrain"} <= set(repo.job_names)
    assert repo.get_schedule_def("retrain_schedule").cron_schedule == "0 3 * * 0"
    assert repo.has_sensor_def("new_teacher_sensor")
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"geopile_manifest", "geopile_shards", "foundation_model", "finetuned_models", "evaluation_report",
            "imagenet_teacher", "champion_model"} <= keys
    part = repo.asset_graph.get(dg.AssetKey("finetuned_models")).partitions_def
    assert part.get_partition_keys() == ["scene", "change"]


def test_whole_graph_materialises(tiny):
    tmp, path, resources = tiny
    defs = build_defs(str(path))
    upstream = [A.geopile_manifest, A.great_expectations_suite, A.geopile_shards, A.imagenet_teacher,
                A.foundation_model, A.ablation_models]
    res = dg.materialize(upstream, resources=resources)
    assert res.success
    checks = res.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    meta = res.asset_materializations_for_node("foundation_model")[0].metadata
    assert meta["steps"].value == 2 and "final_loss" in meta
    finetuned, report = (defs.get_assets_def(k) for k in ("finetuned_models", "evaluation_report"))
    for task in ("scene", "change"):
        assert dg.materialize([finetuned], partition_key=task, resources=resources).success
    rep = dg.materialize([report], resources=resources)
    assert rep.success
    arp = rep.asset_materializations_for_node("evaluation_report")[0].metadata
    assert arp["arp_imagenet"].value == 0.0 and "arp_gfm" in arp
    assert (tmp / "evaluate" / "radar.png").is_file()
    champion = defs.get_assets_def("champion_model")
    pro = dg.materialize([champion], resources=resources)
    meta = pro.asset_materializations_for_node("champion_model")[0].metadata
    assert meta["registered"].value == "models:/gfm-foundation/1"
    # the gate's verdict follows the numbers: promoted iff gfm's ARP beats every other model's
    arps = {k.removeprefix("arp_"): v.value for k, v in arp.items() if k.startswith("arp_")}
    assert meta["promoted"].value == all(arps["gfm"] > v for k, v in arps.items() if k != "gfm")


def test_blocking_check_stops_downstream_on_a_bad_pile(repo_root, tiny, tmp_path):
    tmp, _, _ = tiny
    shutil.copytree(tmp / "demo", tmp_path / "demo")
    path = _write_params(repo_root, tmp_path, min_size=1000)  # no demo image is that large: the suite fails
    resources = {"gfm": GfmParams(params_path=str(path)), "launcher": PretrainLauncher()}
    res = dg.materialize([A.geopile_manifest, A.great_expectations_suite, A.geopile_shards],
                         resources=resources, raise_on_error=False)
    assert [c.passed for c in res.get_asset_check_evaluations()] == [False]
    done = {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert "geopile_manifest" in done and "geopile_shards" not in done
    assert not (tmp_path / "geopile" / "shards").exists()


def test_teacher_sensor_one_run_per_new_teacher(tiny):
    tmp, path, _ = tiny
    sensor = build_defs(str(path)).get_repository_def().get_sensor_def("new_teacher_sensor")
    teachers = tmp / "teachers"
    teachers.mkdir(exist_ok=True)
    empty = sensor(dg.build_sensor_context(cursor=None))
    assert empty.run_requests == []
    shutil.copy(tmp / "demo" / "teacher" / "tf_efficientnet_lite0.safetensors", teachers / "lite0.safetensors")
    first = sensor(dg.build_sensor_context(cursor=empty.cursor))
    assert len(first.run_requests) == 1
    sha = next(iter(scan_teachers(teachers, ("*.safetensors",))))
    assert first.run_requests[0].run_key == sha
    again = sensor(dg.build_sensor_context(cursor=first.cursor))
    assert again.run_requests == []  # the same teacher never triggers twice
    assert json.loads(again.cursor) == [sha]


def test_missing_teacher_names_the_key_and_file(tiny, tmp_path):
    _tmp, path, _ = tiny
    params = GfmParams(params_path=str(path)).load()
    gone = params.model_copy(update={"pretrain": params.pretrain.model_copy(
        update={"teacher": params.pretrain.teacher.model_copy(update={"checkpoint": tmp_path / "nope.pth"})})})
    with pytest.raises(ConfigError, match=r"pretrain\.teacher\.checkpoint: .*nope\.pth not found"):
        A.teacher_file(gone)


def test_launcher_commands_for_multi_gpu(tiny):
    _, path, _ = tiny
    gfm = GfmParams(params_path=str(path))
    torchrun = PretrainLauncher(mode="torchrun", nproc_per_node=8).command(gfm)
    assert Path(torchrun[0]).name == "torchrun" and "--nproc_per_node=8" in torchrun
    assert torchrun[2:] == ["-m", "gfm_core.cli", "pretrain", "--params", str(path)]
    ds = PretrainLauncher(mode="deepspeed", nproc_per_node=4).command(gfm, baseline="mim_only")
    assert Path(ds[0]).name == "deepspeed" and "--module" in ds and ds[-2:] == ["--baseline", "mim_only"]
