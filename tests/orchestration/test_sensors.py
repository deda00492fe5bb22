"""Retraining triggers: the teacher sensor's cursor and run keys, timm announcements, and what follows a retrain."""

from __future__ import annotations

import hashlib
import json
import shutil

import dagster as dg
import timm
from dagster_params import TEACHER, write_params

from gfm_core.io import sha256_file
from orchestration.definitions import build_defs
from orchestration.resources import GfmParams


def _sensor(path):
    return build_defs(str(path)).get_repository_def().get_sensor_def("new_teacher_sensor")


def test_one_run_per_new_teacher_file_and_none_on_the_next_tick(repo_root, workdir):
    path = write_params(repo_root, workdir)
    sensor = _sensor(path)
    teachers = workdir / "teachers"
    teachers.mkdir()
    shutil.copy(workdir / "demo" / "teacher" / TEACHER, teachers / TEACHER)  # the teacher already in force
    first = sensor(dg.build_sensor_context(cursor=None))
    assert first.run_requests == [] and "no new teacher" in first.skip_reason.skip_message

    new = teachers / "tf_efficientnet_lite0.retrained.safetensors"  # timm naming: <arch>.<tag>
    data = bytearray((workdir / "demo" / "teacher" / TEACHER).read_bytes())
    data[-1] ^= 1  # another checkpoint of the same arch
    new.write_bytes(bytes(data))
    settling = sensor(dg.build_sensor_context(cursor=first.cursor))
    assert settling.run_requests == [] and "waiting for 1 file(s) to stop changing" in settling.skip_reason.skip_message
    second = sensor(dg.build_sensor_context(cursor=settling.cursor))  # unchanged since the previous tick
    (req,) = second.run_requests
    sha = sha256_file(new)
    assert req.run_key == sha and req.job_name in (None, "retrain")
    assert req.tags == {"gfm/teacher_sha256": sha, "gfm/teacher_file": str(new),
                        "gfm/teacher_arch": "tf_efficientnet_lite0"}
    third = sensor(dg.build_sensor_context(cursor=second.cursor))
    assert third.run_requests == []  # the same teacher never triggers twice
    assert sha in json.loads(third.cursor)["sha256"]

    # the run's tags make the pretraining assets use that teacher
    params = GfmParams(params_path=str(path)).for_run(req.tags).load()
    assert params.pretrain.teacher.checkpoint == new


def test_a_sidecar_names_the_arch_and_an_old_list_cursor_is_read(repo_root, workdir):
    path = write_params(repo_root, workdir)
    teachers = workdir / "teachers"
    teachers.mkdir()
    ckpt = teachers / "vendor_release_v2.pth"
    ckpt.write_bytes(b"weights")
    (teachers / "vendor_release_v2.json").write_text(json.dumps({"arch": "swin_base_patch4_window7_224"}))
    first = _sensor(path)(dg.build_sensor_context(cursor=json.dumps([])))  # an older cursor: the seen hashes
    assert first.run_requests == []  # its files are new to the cursor: they must stay unchanged for a tick
    res = _sensor(path)(dg.build_sensor_context(cursor=first.cursor))
    (req,) = res.run_requests
    assert req.tags["gfm/teacher_arch"] == "swin_base_patch4_window7_224"
    seen = {**json.loads(first.cursor), "sha256": [sha256_file(ckpt)]}
    again = _sensor(path)(dg.build_sensor_context(cursor=json.dumps(seen)))
    assert again.run_requests == []


def test_a_half_copied_teacher_waits_until_its_size_and_mtime_hold_still(repo_root, workdir):
    path = write_params(repo_root, workdir)
    sensor = _sensor(path)
    teachers = workdir / "teachers"
    teachers.mkdir()
    data = bytearray((workdir / "demo" / "teacher" / TEACHER).read_bytes())
    data[-1] ^= 1
    copy = teachers / "tf_efficientnet_lite0.copied.safetensors"
    copy.write_bytes(bytes(data[: len(data) // 2]))  # the copy is under way
    ticks = [sensor.evaluate_tick(dg.build_sensor_context(cursor=None))]
    with open(copy, "ab") as f:
        f.write(bytes(data[len(data) // 2 :]))  # ... and done by the next tick
    ticks.append(sensor.evaluate_tick(dg.build_sensor_context(cursor=ticks[-1].cursor)))
    assert [t.run_requests for t in ticks] == [[], []]
    assert sha256_file(copy) not in json.loads(ticks[-1].cursor)["sha256"]  # the partial file was never judged
    ticks.append(sensor.evaluate_tick(dg.build_sensor_context(cursor=ticks[-1].cursor)))  # unchanged: now it counts
    (req,) = ticks[-1].run_requests
    assert req.run_key == sha256_file(copy) == hashlib.sha256(data).hexdigest()
    ticks.append(sensor.evaluate_tick(dg.build_sensor_context(cursor=ticks[-1].cursor)))
    assert ticks[-1].run_requests == []


def test_new_timm_weights_are_announced_once(repo_root, workdir):
    path = write_params(repo_root, workdir, edit=lambda raw: raw["retrain"].update(timm_patterns=["swin_base*"]))
    sensor = _sensor(path)
    names = sorted(timm.list_pretrained("swin_base*"))
    baseline = sensor(dg.build_sensor_context(cursor=None))  # the first tick only records timm's list
    assert json.loads(baseline.cursor)["timm"] == {"version": timm.__version__, "names": names}
    assert baseline.skip_reason.skip_message.startswith("no new teacher")
    older = json.loads(baseline.cursor)
    older["timm"] = {"version": "1.0.0", "names": names[1:]}  # as an older timm listed them
    upgraded = sensor(dg.build_sensor_context(cursor=json.dumps(older)))
    assert upgraded.run_requests == []  # nothing is downloaded: no run without local weights
    message = upgraded.skip_reason.skip_message
    assert names[0] in message and f"timm {timm.__version__}" in message and str(workdir / "teachers") in message
    quiet = sensor(dg.build_sensor_context(cursor=upgraded.cursor))
    assert quiet.skip_reason.skip_message.startswith("no new teacher")


def test_schedule_and_automation_make_downstream_follow_a_retrain(repo_root, tmp_path):
    path = write_params(repo_root, tmp_path, edit=lambda raw: raw["retrain"].update(cron="15 4 * * 1"))
    defs = build_defs(str(path))
    assert defs.get_repository_def().get_schedule_def("retrain_schedule").cron_schedule == "15 4 * * 1"
    instance = dg.DagsterInstance.ephemeral()
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert before.total_requested == 0  # nothing upstream yet
    for key in ("geopile_shards", "foundation_model", "ablation_models"):  # as a finished retrain run leaves them
        instance.report_runless_asset_event(dg.AssetMaterialization(key))
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    assert after.get_requested_partitions(dg.AssetKey("finetuned_models")) == {"scene", "change"}
    assert after.total_requested == 2  # evaluation waits for the fine-tuning


def test_the_schedule_retrains_on_the_champions_teacher(repo_root, workdir):
    import mlflow

    from gfm_core import tracking
    from orchestration.resources import TEACHER_ARCH_TAG, TEACHER_FILE_TAG

    path = write_params(repo_root, workdir)
    schedule = build_defs(str(path)).get_repository_def().get_schedule_def("retrain_schedule")

    def tick_tags():
        (req,) = schedule.evaluate_tick(dg.build_schedule_context()).run_requests
        return {k: v for k, v in req.tags.items() if k.startswith("gfm/")}

    assert tick_tags() == {}  # no champion yet: the params' teacher
    in_force = workdir / "demo" / "teacher" / TEACHER
    teachers = workdir / "teachers"
    teachers.mkdir()
    upgrade = teachers / "tf_efficientnet_lite0.upgraded.safetensors"
    data = bytearray(in_force.read_bytes())
    data[-1] ^= 1
    upgrade.write_bytes(bytes(data))

    tracking.configure(GfmParams(params_path=str(path)).load().tracking)
    client = mlflow.MlflowClient()
    client.create_registered_model("gfm-foundation")
    for sha in (sha256_file(in_force), sha256_file(upgrade), "0" * 64):
        v = client.create_model_version("gfm-foundation", str(workdir), tags={"gfm.teacher_sha256": sha})
        client.set_registered_model_alias("gfm-foundation", "champion", v.version)
        tags = tick_tags()
        if sha == sha256_file(upgrade):  # a promoted teacher upgrade sticks
            assert tags[TEACHER_FILE_TAG] == str(upgrade) and tags[TEACHER_ARCH_TAG] == "tf_efficientnet_lite0"
        else:  # the params' own teacher, or a teacher file no longer in the folder
            assert tags == {}, sha
