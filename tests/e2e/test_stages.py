"""The stage functions end to end on the real demo data, at a few steps."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from PIL import Image

from gfm_core import cli, stages
from gfm_core.config import parse_params
from gfm_core.errors import DataValidationError
from gfm_core.models.backbones import load_backbone


def _params(repo_root, tmp, **pretrain):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["demo_data"]["root"] = str(tmp / "demo")
    demo = raw["presets"]["demo"]
    demo["ingest"].update(root=str(tmp / "demo" / "pile"), out_dir=str(tmp / "geopile"))
    demo["pretrain"]["teacher"]["checkpoint"] = str(tmp / "demo" / "teacher" / stages.TEACHER_FILE)
    for task in demo["finetune"]["tasks"]:  # the contamination check reads the tasks' test splits
        task["root"] = str(tmp / "demo" / "tasks" / task["name"])
    demo["pretrain"].update(out_dir=str(tmp / "pretrain"), batch_size=4, max_steps=4, log_every=2,
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
    assert ing.accepted == 282 and ing.quarantined == 0 and ing.stats.is_file()
    val = stages.run_validate(demo_params)
    assert val.success and val.n_expectations >= 10 and val.docs is not None and val.docs.is_file()
    sh = stages.run_shards(demo_params, progress=False)
    assert sh.images == 282 and sh.rebuilt
    assert not stages.run_shards(demo_params, progress=False).rebuilt  # up to date: nothing rewritten

    res = stages.run_pretrain(demo_params)
    assert res.steps == 4 and res.device == "cpu"
    assert {"loss", "mim", "distill", "cosine", "lr", "images_per_s"} <= set(res.metrics)
    learning = {"mim_holdout", "mim_trivial_holdout", "cos_holdout", "cos_mean_vector_holdout"}
    assert learning <= set(res.metrics)  # measured at every logged step
    summary = json.loads(res.summary_json.read_text())
    assert summary["steps"] == 4 and summary["train_images"] + summary["holdout_images"] == 282
    assert {"mim_ratio_holdout", "cos_margin_holdout", "mim_holdout_start"} <= set(summary)
    assert summary["teacher_pool"] == 32
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


def test_resume_continues_from_the_last_checkpoint(demo_params, tmp_path):
    raw = demo_params.model_dump(mode="json")
    raw["pretrain"].update(out_dir=str(tmp_path / "again"))
    params = parse_params({**raw, "preset": None}, source="test-params")
    first = stages.run_pretrain(params, max_steps=2)
    assert first.steps == 2
    resumed = stages.run_pretrain(params, resume=True, max_steps=2)
    assert resumed.steps == 2  # already complete: nothing left to do, nothing re-done


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain:\n  alpah: 1\n")
    assert cli.main(["pretrain", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "gfm pretrain: error:" in err and "pretrain.alpah: unknown key" in err
    assert "Traceback" not in err


@pytest.mark.distributed
def test_pretrain_on_the_deepspeed_engine(repo_root, demo_params, tmp_path):
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
    raw["pretrain"].update(out_dir=str(tmp_path / "fall"), batch_size=8, max_steps=30, log_every=10,
                           checkpoint_every=30)
    res = stages.run_pretrain(parse_params({**raw, "preset": None}, source="test-params"))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    assert res.history[-1]["cosine"] > res.history[0]["cosine"]  # the student moves towards the teacher


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
