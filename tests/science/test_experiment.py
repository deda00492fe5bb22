"""The whole science path on a tiny config: pile -> pretraining variants -> probes -> bootstrap -> report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from helpers.rasters import make_geotiff
from safetensors.torch import save_file

from gfm_core.config import parse_params
from gfm_core.science.experiment import pretrain_runs, random_init, run_science

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])


def _labelled_scene(path_img, path_mask, seed, size=64):
    """Four classes in a checkerboard of 16 px cells (every 32 px block holds all four), each with its own colour
    plus texture, so a probe can learn them."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:size, 0:size] // 16
    labels = ((r % 2) * 2 + c % 2).astype(np.uint8)
    colours = np.array([[40, 120, 40], [200, 200, 200], [30, 60, 160], [150, 110, 60]])
    img = colours[labels].transpose(2, 0, 1) + rng.normal(0, 12, (3, size, size))
    make_geotiff(path_img, data=np.clip(img, 0, 255).astype(np.uint8))
    make_geotiff(path_mask, data=(labels + 1)[None])  # codes 1..4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("science")
    for src in ("aerial", "landsat"):
        for i in range(6):
            make_geotiff(root / "pile" / src / "c" / f"{i}.tif", size=64, seed=i + (10 if src == "aerial" else 0))
    for i in range(2):
        _labelled_scene(root / "eval" / "images" / f"s{i}.tif", root / "eval" / "masks" / f"s{i}.tif", i)
    torch.manual_seed(3)
    teacher = timm.create_model(SWIN, pretrained=False, num_classes=0, img_size=64, window_size=2, **TINY)
    save_file(teacher.state_dict(), str(root / "teacher.safetensors"))
    raw = {
        "ingest": {"root": str(root / "pile"), "out_dir": str(root / "geopile"), "stretch": [2, 98],
                   "sources": [{"name": "aerial", "root": "aerial"}, {"name": "landsat", "root": "landsat"}],
                   "settings": {"min_size": 32, "workers": 0}},
        "validate": {"min_size": 32, "data_docs": False},
        "finetune": {"tasks": []},
        "pretrain": {
            "student": {"arch": SWIN, "img_size": 32, "window_size": 2, **TINY},
            "teacher": {"arch": SWIN, "checkpoint": str(root / "teacher.safetensors"), "img_size": 64,
                        "feature_stage": 3, "timm_kwargs": {"window_size": 2, **TINY}},
            "mask_patch_size": 8, "crop_scale": [0.3, 1.0], "samples_per_epoch": 64,
            "source_weights": {"aerial": 0.5, "landsat": 0.5}, "holdout_fraction": 0.2, "holdout_crops": 8,
            "teacher_pool": 24, "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "lr_scaling": "none",
            "base_lr": 1e-3, "precision": "fp32", "backend": "torch", "num_workers": 0, "log_every": 2,
            "checkpoint_every": 100,
        },
        "tracking": {"enabled": False},
        "science": {
            "seeds": [0, 1], "steps": 4, "curve_fractions": [0.5, 1.0], "folds": 2, "probe_iters": 5,
            "n_bootstrap": 100, "student_levels": [0, 1, 2], "teacher_levels": [0, 1, 2],
            "out_dir": str(root / "out"),
            "eval_sets": [{"name": "quadrants", "root": str(root / "eval"), "mask_values": [1, 2, 3, 4],
                           "block_size": 32, "margin": 4, "pixels_per_block": 24}],
        },
    }
    return parse_params(raw, source="tiny science")


def test_the_whole_science_path_runs_and_reports_every_hypothesis(tiny):
    res = run_science(tiny)
    report = json.loads(res.report_json.read_text())
    assert set(report["hypotheses"]) == {"H1", "H2", "H3", "H4"}
    for h, body in report["hypotheses"].items():
        v = body["sets"]["quadrants"]
        assert v["verdict"] in {"supported", "contradicted", "inconclusive", "untestable"}, (h, v)
        if v["verdict"] != "untestable":
            assert {"diff", "ci", "seeds_agree", "p_holm"} <= set(v) and v["seeds_agree"].endswith("/2")
            assert v["ci"][0] <= v["diff"] <= v["ci"][1] or v["ci"][0] == v["ci"][1]
    assert set(report["table"]["quadrants"]) == {"majority", "raw", "teacher", "random", "gfm", "mim_only",
                                                 "distill_only"}
    assert report["table"]["quadrants"]["majority"]["pixel_accuracy"] < 40  # four equal classes: priors only
    assert report["table"]["quadrants"]["raw"]["pixel_accuracy"] > 90  # colour separates the quadrants
    assert report["relevance"]["quadrants"]["protocol"] == "leave one image out"
    assert len(report["runs"]) == 6 and all(r["step_flops"] > 0 for r in report["runs"])
    assert report["design"]["quadrants"]["images"] == 2
    assert "H1" in report["sensitivity_image_identity"] or report["hypotheses"]["H1"]["sets"]["quadrants"][
        "verdict"] == "untestable"
    tiles = report["tiles"]["quadrants"]
    assert set(tiles) == {"knn", "logistic"}
    for probe in tiles.values():  # every model of the dense table has a tile row, every comparison but H4 a CI
        assert set(probe["accuracy"]) == set(report["table"]["quadrants"]) and set(probe["comparisons"]) == {
            "H1", "H2", "H3"}
    assert "tile-level probes on quadrants" in res.report_md.read_text()
    assert res.report_md.read_text().startswith("# Science report")
    assert (res.report_json.parent / "curve.png").is_file()

    stamps = sorted(tiny.science.out_dir.glob("runs/*/seed*/science_run.json"))
    before = [p.stat().st_mtime_ns for p in stamps]
    again = pretrain_runs(tiny)  # finished runs with unchanged settings are reused, not trained again
    assert len(stamps) == 6 and [p.stat().st_mtime_ns for p in stamps] == before
    assert {(r.variant, r.seed) for r in again} == {(r["variant"], r["seed"]) for r in report["runs"]}


def test_random_init_is_the_pretraining_start(tiny):
    from gfm_core.objectives import build_continual_pretrain
    from gfm_core.training.checkpoint import seed_everything

    seed_everything(1)
    obj = build_continual_pretrain(tiny.pretrain)  # what run_pretrain builds for seed 1 before any step
    enc = random_init(tiny, 1)
    ref = obj.student.encoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in enc.state_dict().items())
