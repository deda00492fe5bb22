"""Task metrics against hand-computed values, their per-sample recomputation, ARP and the paired bootstrap."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from gfm_core.errors import ConfigError, DataValidationError
from gfm_core.evaluation.metrics import (
    ChangeMetrics,
    ClassificationMetrics,
    MultilabelMetrics,
    SegmentationMetrics,
    SuperResMetrics,
    build_metrics,
    confusion_matrices,
    metrics_from_stats,
)
from gfm_core.evaluation.report import (
    RunScores,
    average_relative_performance,
    build_report,
    paired_bootstrap,
    to_markdown,
    write_report,
)


def test_top1_accuracy_by_hand():
    m = ClassificationMetrics(3)
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    m.update(scores, torch.tensor([0, 1, 1, 1]))  # right, right, wrong, wrong
    assert m.compute()["acc"] == pytest.approx(50.0)
    stats = m.per_sample()
    np.testing.assert_array_equal(stats["correct"], [1, 1, 0, 0])
    assert metrics_from_stats("classification", stats, np.array([0, 1, 2]))["acc"] == pytest.approx(200 / 3)


def test_micro_map_by_hand():
    # flattened (score, target): 0.9/1, 0.8/1, 0.4/0, 0.35/1, 0.2/0, 0.1/0
    # -> precision at the positives 1, 1, 3/4
    scores = torch.tensor([[0.9, 0.1], [0.4, 0.8], [0.35, 0.2]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0]])
    m = MultilabelMetrics(2)
    m.update(scores[:2], targets[:2])  # two batches
    m.update(scores[2:], targets[2:])
    expected = 100 * (1 + 1 + 0.75) / 3
    assert m.compute()["mAP"] == pytest.approx(expected, abs=1e-4)
    assert metrics_from_stats("multilabel", m.per_sample())["mAP"] == pytest.approx(expected, abs=1e-4)


def test_miou_by_hand_ignores_absent_classes_and_ignore_index():
    target = torch.tensor([[[0, 0], [1, 255]], [[1, 1], [2, 2]]])
    pred = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [2, 0]]])
    # scored pixels: (t, p) = (0,0) (0,1) (1,1) | (1,1) (1,1) (2,2) (2,0); class 3 never occurs
    # IoU0 = 1 / (2 + 2 - 1) = 1/3, IoU1 = 3 / (3 + 4 - 3) = 3/4, IoU2 = 1 / (2 + 1 - 1) = 1/2
    m = SegmentationMetrics(4, ignore_index=255)
    m.update(pred, target)
    out = m.compute()
    expected = 100 * (1 / 3 + 3 / 4 + 1 / 2) / 3
    assert out["mIoU"] == pytest.approx(expected, abs=1e-4)
    assert out["iou_1"] == pytest.approx(75.0, abs=1e-4) and "iou_3" not in out
    again = metrics_from_stats("segmentation", m.per_sample())
    assert again["mIoU"] == pytest.approx(expected, abs=1e-4)
    cm = confusion_matrices(pred, target, 4, 255)
    assert cm.shape == (2, 4, 4) and int(cm.sum()) == 7 and int(cm[0, 0, 1]) == 1


def test_change_precision_recall_f1_by_hand():
    pred = torch.tensor([[[1, 1], [0, 0]], [[1, 0], [0, 0]]])
    target = torch.tensor([[[1, 0], [1, 0]], [[1, 0], [0, 1]]])
    # tp 2, fp 1, fn 2 -> P 2/3, R 1/2, F1 4/7
    m = ChangeMetrics()
    m.update(pred, target)
    out = m.compute()
    assert out["precision"] == pytest.approx(200 / 3, abs=1e-4)
    assert out["recall"] == pytest.approx(50.0, abs=1e-4)
    assert out["F1"] == pytest.approx(400 / 7, abs=1e-4)
    stats = m.per_sample()
    np.testing.assert_array_equal(stats["tp"], [1, 1])
    assert metrics_from_stats("change", stats)["F1"] == pytest.approx(400 / 7, abs=1e-4)
    # no predicted and no true change: all zero, not NaN
    assert (
        metrics_from_stats("change", {"tp": np.zeros(2), "fp": np.zeros(2), "fn": np.zeros(2)})["F1"] == 0.0
    )


def test_psnr_and_ssim_by_hand():
    target = torch.full((2, 3, 16, 16), 0.5)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> PSNR 20 dB
    pred[1] = 0.25  # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    m = SuperResMetrics()
    m.update(pred, target)
    stats = m.per_sample()
    assert stats["psnr"][0] == pytest.approx(20.0, abs=1e-3)
    assert stats["psnr"][1] == pytest.approx(10 * math.log10(1 / 0.0625), abs=1e-3)
    c1 = 1e-4
    ssim_1 = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)
    ssim_0 = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    np.testing.assert_allclose(stats["ssim"], [ssim_0, ssim_1], atol=1e-4)
    out = m.compute()
    assert out["PSNR"] == pytest.approx(float(np.mean(stats["psnr"])), abs=1e-4)
    assert out["SSIM"] == pytest.approx((ssim_0 + ssim_1) / 2, abs=1e-4)
    again = metrics_from_stats("superres", stats)  # what the bootstrap recomputes
    assert again == pytest.approx(out, abs=1e-4)
    ident = SuperResMetrics()
    ident.update(target[:1], target[:1])
    assert ident.compute()["SSIM"] == pytest.approx(1.0, abs=1e-6)


def test_unknown_head_lists_valid_names():
    with pytest.raises(ConfigError, match="classification, multilabel, segmentation, superres"):
        build_metrics("detection", 3)
    with pytest.raises(ConfigError, match="unknown task head 'detection'"):
        metrics_from_stats("detection", {})


def test_arp_by_hand():
    base = {"a": 50.0, "b": 20.0}
    assert average_relative_performance({"a": 55.0, "b": 19.0}, base) == pytest.approx((10.0 - 5.0) / 2)
    assert average_relative_performance(base, base) == 0.0
    assert average_relative_performance({"a": 60.0, "b": math.nan}, base) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="baseline score is 0"):
        average_relative_performance({"a": 1.0}, {"a": 0.0})


def _cls_stats(correct: np.ndarray) -> dict[str, np.ndarray]:
    return {"correct": correct.astype(np.float64)}


def test_paired_bootstrap_behaviour():
    rng = np.random.default_rng(0)
    ref = [_cls_stats(rng.random(200) < 0.7) for _ in range(3)]
    same = paired_bootstrap("classification", "acc", ref, ref, n_bootstrap=200, seed=1)
    assert same == (0.0, 0.0, 0.0)  # identical runs: the paired difference is exactly 0 on every draw
    better = [_cls_stats(np.maximum(r["correct"], rng.random(200) < 0.5)) for r in ref]
    diff, lo, hi = paired_bootstrap("classification", "acc", better, ref, n_bootstrap=300, seed=1)
    assert 0 < lo <= diff <= hi
    assert paired_bootstrap("classification", "acc", better, ref, n_bootstrap=300, seed=1) == (diff, lo, hi)
    # more test samples -> narrower interval
    small = paired_bootstrap(
        "classification",
        "acc",
        [{"correct": b["correct"][:40]} for b in better],
        [{"correct": r["correct"][:40]} for r in ref],
        n_bootstrap=300,
        seed=1,
    )
    assert small[2] - small[1] > hi - lo
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap("classification", "acc", better[:2], ref, n_bootstrap=10)


def _run(task: str, model: str, seed: int, correct: np.ndarray) -> RunScores:
    stats = _cls_stats(correct)
    acc = metrics_from_stats("classification", stats)["acc"]
    return RunScores(
        task,
        "classification",
        model,
        seed,
        "acc",
        {"acc": acc},
        [f"s{i}" for i in range(len(correct))],
        stats,
    )


def test_report_table_arp_and_files(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        base = rng.random(50) < 0.6
        runs += [
            _run("t1", "imagenet", seed, base),
            _run("t1", "gfm", seed, base | (rng.random(50) < 0.3)),
            _run("t1", "random", seed, base & (rng.random(50) < 0.5)),
        ]
    report = build_report(runs, baseline="imagenet", reference="gfm", n_bootstrap=100)
    assert report.models == ["imagenet", "gfm", "random"] and report.columns == [("t1", "acc")]
    imagenet, gfm = report.cell("imagenet", "t1"), report.cell("gfm", "t1")
    assert report.arp["imagenet"] == 0.0
    assert report.arp["gfm"] == pytest.approx(100 * (gfm - imagenet) / imagenet)
    ci = report.ci["random"]["t1"]
    assert ci.diff == pytest.approx(report.cell("random", "t1") - gfm) and ci.hi < 0 and ci.n_seeds == 2
    assert "gfm" not in report.ci
    written = write_report(report, tmp_path / "eval")
    for key in ("csv", "bootstrap_csv", "markdown", "json", "radar"):
        assert written.paths[key].is_file() and written.paths[key].stat().st_size > 0, key
    assert written.paths["radar"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(written.paths["json"].read_text())
    assert data["arp"]["gfm"] == pytest.approx(report.arp["gfm"])
    assert written.paths["csv"].read_text().splitlines()[0] == "model,t1/acc,ARP"
    assert not list((tmp_path / "eval").glob("*.tmp"))
    md = to_markdown(report)
    assert "| gfm |" in md and "ARP vs imagenet" in md and "± " in md


def test_report_refuses_unpaired_samples_and_unknown_roles():
    a = _run("t1", "imagenet", 0, np.ones(5, bool))
    b = _run("t1", "gfm", 0, np.ones(6, bool))
    with pytest.raises(DataValidationError, match="other samples"):
        build_report([a, b], baseline="imagenet", reference="gfm")
    with pytest.raises(ConfigError, match=r"evaluate\.baseline 'imagenet'"):
        build_report([b], baseline="imagenet", reference="gfm")


def test_report_excludes_tasks_from_arp_with_a_reason_and_states_power():
    rng = np.random.default_rng(1)
    runs = []
    for seed in (0, 1):
        base = rng.random(40) < 0.5
        for task in ("t1", "t2"):
            runs += [_run(task, "imagenet", seed, base), _run(task, "gfm", seed, base ^ (rng.random(40) < 0.1))]
    report = build_report(runs, baseline="imagenet", reference="gfm", n_bootstrap=200,
                          arp_exclude={"t2": "no model beats bicubic"})
    rel = 100 * (report.cell("gfm", "t1") - report.cell("imagenet", "t1")) / report.cell("imagenet", "t1")
    assert report.arp["gfm"] == pytest.approx(rel)  # t2 is reported but not averaged
    ci = report.ci["imagenet"]["t1"]
    assert ci.mdd == pytest.approx(2.8 * (ci.hi - ci.lo) / 3.92, rel=1e-3) and report.task_mdd("t1") == ci.mdd
    md = to_markdown(report)
    assert "Tasks outside ARP: **t2** (no model beats bicubic)" in md and "resolvable difference" in md
    assert ("**t1** does not rank the models" in md) == (not ci.excludes_zero)


def _pooled_runs(rates: tuple[float, ...], *, same: bool = False) -> list[RunScores]:
    """imagenet (one run) and gfm_s0.. (one per pretraining run, accuracy ``rates[j]``) on 2 fine-tuning seeds."""
    rng = np.random.default_rng(5)
    u = rng.random(200)
    runs = []
    for seed in (0, 1):
        runs.append(_run("t1", "imagenet", seed, u < 0.7))
        for j, rate in enumerate(rates):
            noise = rng.random(200) < 0.05  # a fine-tuning seed flips a few samples
            r = _run("t1", f"gfm_s{j}", seed, (u < (rates[0] if same else rate)) ^ noise)
            runs.append(replace(r, backbone_sha256=f"b{j}"))
    return runs


def test_pooled_pretraining_seeds_put_their_variance_in_the_interval():
    members = ["gfm_s0", "gfm_s1", "gfm_s2"]
    spread = _pooled_runs((0.5, 0.7, 0.9))
    kw = dict(baseline="imagenet", reference="imagenet", n_bootstrap=400)
    pooled = build_report(spread, pretraining_seeds={"gfm": members}, **kw)
    alone = build_report(spread, **kw)  # every pretraining run as its own row: its samples and seeds only
    assert pooled.models == ["imagenet", "gfm"] and pooled.pretrainings == {"gfm": members}
    assert pooled.cell("gfm", "t1") == pytest.approx(np.mean([alone.cell(m, "t1") for m in members]))
    ci = pooled.ci["gfm"]["t1"]
    assert ci.n_pretrainings == 3 and ci.n_seeds == 6
    assert ci.lo < ci.diff < ci.hi
    widest_alone = max(alone.ci[m]["t1"].hi - alone.ci[m]["t1"].lo for m in members)
    assert ci.hi - ci.lo > 2 * widest_alone  # 40 points between pretraining runs dominate the interval
    assert pooled.backbones["gfm_s1"] == "b1" and pooled.backbones["gfm"] is None  # each run kept its own bytes

    flat = build_report(_pooled_runs((0.7, 0.7, 0.7), same=True), pretraining_seeds={"gfm": members}, **kw)
    flat_ci = flat.ci["gfm"]["t1"]
    alone_flat = build_report(_pooled_runs((0.7, 0.7, 0.7), same=True), **kw).ci["gfm_s0"]["t1"]
    assert flat_ci.hi - flat_ci.lo < 1.5 * (alone_flat.hi - alone_flat.lo)  # no pretraining variance: no widening

    md = to_markdown(pooled)
    assert "| gfm (3 pretrainings) |" in md and "pretraining runs of the pooled rows gfm (3)" in md
    others = [replace(r, model=r.model.replace("gfm_s", "o_")) for r in spread if r.model in ("gfm_s0", "gfm_s1")]
    with pytest.raises(ConfigError, match="gfm pools 3 pretraining runs and other 2"):
        build_report([*spread, *others], pretraining_seeds={"gfm": members, "other": ["o_0", "o_1"]},
                     baseline="imagenet", reference="other", n_bootstrap=10)


def test_promotion_refuses_a_pooled_candidate(repo_root):
    from gfm_core.config import load_params
    from gfm_core.registry import Evaluation

    report = build_report(_pooled_runs((0.5, 0.7)), pretraining_seeds={"gfm": ["gfm_s0", "gfm_s1"]},
                          baseline="imagenet", reference="imagenet", n_bootstrap=10)
    params = load_params(repo_root / "params.yaml")
    for name in ("gfm", "gfm_s1"):  # the pooled row, or one of its runs hidden in it
        with pytest.raises(ConfigError, match="pools it with other pretraining runs"):
            Evaluation.from_report(report, params, candidate=name)


def test_a_task_where_only_the_trivial_row_separates_does_not_rank_the_models():
    rng = np.random.default_rng(2)
    runs = []
    for seed in (0, 1):
        base = rng.random(60) < 0.7
        runs += [_run("t1", "imagenet", seed, base ^ (rng.random(60) < 0.05)), _run("t1", "gfm", seed, base),
                 _run("t1", "trivial", seed, np.zeros(60, bool))]
    report = build_report(runs, baseline="imagenet", reference="gfm", n_bootstrap=200)
    assert report.ci["trivial"]["t1"].excludes_zero and not report.ci["imagenet"]["t1"].excludes_zero
    assert "**t1** does not rank the models" in to_markdown(report)
