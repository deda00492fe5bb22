"""The stage functions end to end on the real demo data, at a few steps."""

from __future__ import annotations

import csv
import json
import math

import pytest
import timm
import torch
import yaml
from helpers.bench import load_benchmark
from PIL import Image

from gfm_core import cli, stages
from gfm_core.config import parse_params
from gfm_core.errors import CheckpointError, DataValidationError
from gfm_core.io import load_weights
from gfm_core.models.weights import load_backbone
from gfm_core.stages.data import demo_under
from gfm_core.training.checkpoint import exclusive_out_dir


def _params(repo_root, tmp, **pretrain):
    raw = demo_under(yaml.safe_load((repo_root / "params.yaml").read_text()), tmp)
    raw["presets"]["demo"]["pretrain"].update(out_dir=str(tmp / "pretrain"), batch_size=4, max_steps=4, log_every=2,
                                              checkpoint_every=2, teacher_pool=32, holdout_crops=8, **pretrain)
    return parse_params(raw, source="test-params")


@pytest.fixture(scope="module")
def demo_params(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    params = _params(repo_root, tmp)
    stages.run_demo_data(params)
    return params


def test_ingest_then_pretrain_exports_a_loadable_backbone(demo_params):
    with pytest.raises(DataValidationError, match="run `gfm validate` first"):
        stages.run_shards(demo_params)  # shards are only written from a validated pile
    ing = stages.run_ingest(demo_params, progress=False)
    assert ing.accepted == 130 and ing.quarantined == 0 and ing.stats.is_file()
    val = stages.run_validate(demo_params)
    assert val.success and val.n_expectations >= 10 and val.docs is not None and val.docs.is_file()
    sh = stages.run_shards(demo_params, progress=False)
    assert sh.images == 130 and sh.rebuilt
    assert not stages.run_shards(demo_params, progress=False).rebuilt  # up to date: nothing rewritten

    res = stages.run_pretrain(demo_params)
    assert res.steps == 4 and res.device == "cpu"
    assert {"loss", "mim", "distill", "cosine", "lr", "images_per_s"} <= set(res.metrics)
    learning = {"mim_holdout", "mim_trivial_holdout", "cos_holdout", "cos_mean_vector_holdout"}
    assert learning <= set(res.metrics)  # measured at every logged step
    summary = json.loads(res.summary_json.read_text())
    assert summary["steps"] == 4 and summary["train_images"] + summary["holdout_images"] == 130
    assert {"mim_ratio_holdout", "cos_margin_holdout", "mim_holdout_start"} <= set(summary)
    assert summary["teacher_pool"] == 32
    compute = summary["compute"]  # the ledger: measured FLOPs of a step, device-hours, energy, CO2
    assert compute["steps"] == 4 and compute["flops"] == 4 * compute["flops_per_step"] > 0
    assert compute["energy_kwh"] > 0 and compute["co2_kg"] > 0 and compute["device_hours"] > 0
    assert compute["pool_flops"] > 0 and compute["pool_s"] > 0  # the teacher pool's one-off forwards, beside
    assert compute["pool_cached"] is False  # built by this run, in a fresh folder
    assert res.tracked_metrics()["compute.flops_per_step"] == compute["flops_per_step"]
    rows = res.metrics_csv.read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3  # header + steps 2 and 4
    assert all(k in rows[0] for k in learning)
    assert res.reconstructions == demo_params.pretrain.out_dir / "reconstructions.png"
    size = demo_params.pretrain.student.img_size
    with Image.open(res.reconstructions) as im:  # 4 held-out rows: input | masked | start | end | pasted
        assert im.size == (5 * size, 4 * size)
    assert (demo_params.pretrain.out_dir / "learning.png").is_file()

    meta = json.loads(res.backbone.with_suffix(".json").read_text())
    assert meta["meta"]["data"]["manifest_content_hash"] == ing.content_hash  # lineage: pile -> weights
    assert meta["meta"]["teacher"]["arch"] == "tf_efficientnet_lite0" and len(meta["meta"]["teacher"]["sha256"]) == 64
    model = load_backbone(res.backbone)
    x = torch.randn(1, 3, 64, 64)
    plain = timm.create_model(meta["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=str(res.backbone)),
                              **meta["timm_kwargs"])
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), plain.forward_features(x))


class _Crash:
    """fit callback: a crash after step ``at`` was logged, between two checkpoints."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_log(self, step, metrics):
        if step == self.at:
            raise KeyboardInterrupt(f"simulated crash after step {step}")


def _tiny_params(demo_params, out, **pretrain):
    raw = demo_params.model_dump(mode="json")
    raw["pretrain"].update(out_dir=str(out), max_steps=3, log_every=1, checkpoint_every=2, **pretrain)
    return parse_params({**raw, "preset": None}, source="test-params")


def _csv(path):
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(path.open())]


def test_resume_continues_from_the_last_checkpoint(demo_params, tmp_path, capsys):
    """Crashed after step 3 was logged (last checkpoint: step 2) and resumed: only step 3 runs again, and
    weights, optimizer state, losses and metrics.csv equal an uninterrupted run's; `gfm pretrain` (no --resume)
    then moves that run aside."""
    full = stages.run_pretrain(_tiny_params(demo_params, tmp_path / "full"))
    params = _tiny_params(demo_params, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        stages.run_pretrain(params, callbacks=[_Crash(at=3)])
    assert [s for s, _ in _csv(params.pretrain.out_dir / "metrics.csv")] == [1, 2, 3]

    resumed = stages.run_pretrain(params, resume=True)
    assert resumed.start_step == 2 and resumed.steps == 3 and resumed.set_aside is None
    assert "resuming from" in resumed.start_reason and resumed.start_reason.endswith("teacher_sha256)")
    assert [h["step"] for h in resumed.history] == [3]  # the step counter continued from the checkpoint
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    a, b = load_weights(full.backbone), load_weights(resumed.backbone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt = [torch.load(r.checkpoint_dir / "step_000003" / "state.pt", weights_only=True)["optimizer"]
           for r in (full, resumed)]
    assert opt[0]["state"].keys() == opt[1]["state"].keys()
    for k, st in opt[0]["state"].items():  # AdamW moments and step counts restored, then advanced identically
        assert all(torch.equal(st[n], opt[1]["state"][k][n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    assert _csv(resumed.metrics_csv) == _csv(full.metrics_csv)  # step 3 replaced, not duplicated

    # `gfm pretrain` without --resume starts fresh and moves the run's checkpoints aside; it deletes nothing
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**params.model_dump(mode="json"), "preset": None}))
    assert cli.main(["pretrain", "--params", str(path), "--max-steps", "1"]) == 0
    (aside,) = params.pretrain.out_dir.glob("checkpoints.stale-*")
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_000002", "step_000003"]
    assert f"moved to {aside}" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_pretrain_fingerprint_binds_data_params_steps_and_teacher_bytes(demo_params, tmp_path):
    cfg = demo_params.pretrain
    fp = stages.pretrain_fingerprint(cfg, "data-hash", 4)
    assert set(fp) == {"data", "params_sha256", "teacher_sha256"} and len(fp["teacher_sha256"]) == 64
    neutral = cfg.model_copy(update={"out_dir": tmp_path, "log_every": 3, "checkpoint_every": 7, "num_workers": 5})
    assert stages.pretrain_fingerprint(neutral, "data-hash", 4) == fp
    moved = tmp_path / "teacher.safetensors"  # the same bytes elsewhere: the same run
    moved.write_bytes(cfg.teacher.checkpoint.read_bytes())
    same_teacher = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": moved})})
    assert stages.pretrain_fingerprint(same_teacher, "data-hash", 4) == fp
    moved.write_bytes(moved.read_bytes() + b"\0")  # other bytes: another run
    assert stages.pretrain_fingerprint(same_teacher, "data-hash", 4)["teacher_sha256"] != fp["teacher_sha256"]
    assert stages.pretrain_fingerprint(cfg, "other-data", 4)["data"] == "other-data"
    assert stages.pretrain_fingerprint(cfg, "data-hash", 5)["params_sha256"] != fp["params_sha256"]
    lr = cfg.model_copy(update={"base_lr": cfg.base_lr * 2})
    assert stages.pretrain_fingerprint(lr, "data-hash", 4)["params_sha256"] != fp["params_sha256"]


def test_two_pretrainings_never_share_an_out_dir(demo_params, tmp_path):
    params = _tiny_params(demo_params, tmp_path / "busy")
    with exclusive_out_dir(params.pretrain.out_dir):  # another run holds the folder
        with pytest.raises(CheckpointError, match=r"pid \d+ on .* is training into this folder right now"):
            stages.run_pretrain(params)
    assert not (params.pretrain.out_dir / "checkpoints").exists()


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain:\n  alpah: 1\n")
    assert cli.main(["pretrain", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "gfm pretrain: error:" in err and "pretrain.alpah: unknown key" in err
    assert "Traceback" not in err


@pytest.mark.distributed
def test_pretrain_on_the_deepspeed_engine(repo_root, demo_params, tmp_path, monkeypatch):
    monkeypatch.setenv("GFM_FORCE_BF16", "1")  # the bf16 path even on a CPU without bf16 kernels
    raw = demo_params.model_dump(mode="json")
    raw["pretrain"].update(backend="deepspeed", zero_stage=1, precision="bf16", out_dir=str(tmp_path / "ds"),
                           max_steps=2, log_every=1)
    params = parse_params({**raw, "preset": None}, source="test-params")
    res = stages.run_pretrain(params)
    assert res.steps == 2 and res.backbone.is_file()
    assert (res.checkpoint_dir / "step_000002" / "state").is_dir()  # DeepSpeed's own checkpoint files
    assert all(torch.isfinite(torch.tensor(v)) for v in res.metrics.values())


def test_loss_falls_on_the_demo_pile(demo_params, tmp_path):
    raw = demo_params.model_dump(mode="json")
    raw["pretrain"].update(out_dir=str(tmp_path / "fall"), batch_size=8, max_steps=60, log_every=20,
                           checkpoint_every=60)
    res = stages.run_pretrain(parse_params({**raw, "preset": None}, source="test-params"))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    # the student moves towards the teacher (over 30 steps fp32 still dipped: 0.41 -> 0.32; over 60, 0.48 -> 0.66)
    assert res.history[-1]["cosine"] > res.history[0]["cosine"]


def test_a_downstream_test_image_planted_in_the_pile_fails_validation(repo_root, demo_params, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    shutil.copytree(demo_params.demo_data.root, tmp_path / "demo")
    params = _params(repo_root, tmp_path)
    test_a = sorted((tmp_path / "demo" / "tasks" / "change" / "A").glob("test_*.png"))[0]
    big = Image.fromarray(np.asarray(Image.open(test_a))).resize((96, 96), Image.Resampling.BICUBIC)
    planted = tmp_path / "demo" / "pile" / "neon_aerial" / "OSBS" / "leaked.png"
    big.save(planted)  # a rescaled, re-encoded copy: a near-duplicate, not an exact one

    stages.run_ingest(params, progress=False)
    val = stages.run_validate(params)
    assert not val.success and "no_test_images_in_pile" in val.failed
    assert test_a.name in val.summary and "leaked.png" in val.summary
    with pytest.raises(DataValidationError, match="downstream test images in the pile"):
        stages.run_shards(params, progress=False)
    with pytest.raises(DataValidationError, match=r"contamination\.json: the contamination check failed"):
        stages.run_pretrain(params)  # no mode of pretraining reads a pile that failed its gates


def test_gfm_demo_runs_every_stage_and_tracks_them_under_the_list_names(repo_root, tmp_path):
    """`gfm demo` end to end at a few steps: one MLflow run per stage of STAGES (one per task for fine-tuning),
    with the metric names the Dagster assets log, and the promotion judged inside its own stage run."""
    import mlflow

    params = _params(repo_root, tmp_path)
    raw = params.model_dump(mode="json", by_alias=True)
    raw["tracking"].update(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=str(tmp_path / "mlartifacts"))
    raw["finetune"].update(tasks=[t for t in raw["finetune"]["tasks"] if t["name"] in ("scene", "change")],
                           seeds=[0], epochs=1, warmup_epochs=0, max_steps=2, out_dir=str(tmp_path / "ft"))
    raw["evaluate"].update(n_bootstrap=20, out_dir=str(tmp_path / "eval"),
                           arp_exclude={})
    raw["promote"].update(must_beat=[])
    raw["preset"] = None
    params = parse_params(raw, source="demo-test")
    lines = list(stages.run_demo(params))
    assert lines[-1].startswith("[mlflow]") and any(line.startswith("[promote]") for line in lines)

    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=100)}
    expected = {s.name for s in stages.STAGES if s.name != "finetune"} | {"finetune_scene", "finetune_change"}
    assert expected <= set(runs), sorted(runs)
    assert {"accepted", "quarantined", "quarantine_rate", "near_duplicates"} <= set(runs["ingest"].data.metrics)
    assert {"passed", "failed_expectations"} <= set(runs["validate"].data.metrics)
    assert "gfm.seed0.acc" in runs["finetune_scene"].data.metrics
    assert {"arp", "promoted", "gate.promoted"} <= set(runs["promote"].data.metrics)
    mlflow.set_tracking_uri(None)


def test_the_curve_benchmark_logs_every_step_of_the_real_pretraining(repo_root, demo_params, tmp_path, monkeypatch):
    curve = load_benchmark(repo_root, monkeypatch, "curve")
    losses = curve.run_curve(demo_params, "fp32", 0, 2, 16, tmp_path / "a")
    again = curve.run_curve(demo_params, "fp32", 0, 2, 16, tmp_path / "b")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses == again  # a seed fixes weights, views and masks: the same run twice gives the same curve
