"""The promotion gate on a real MLflow sqlite registry in tmp_path, with hand-made per-sample evidence."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import numpy as np
import pytest
import torch
from helpers.registry import TINY, tiny_backbone

from gfm_core import registry, tracking
from gfm_core.config import PromoteCfg
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import sha256_file

N = 300
IDS = tuple(f"tile_{i:03d}" for i in range(N))


def _task(task: str, right: int, ids=IDS, seeds=(0, 1)) -> registry.TaskEvidence:
    """A classification task where the first ``right`` test samples are correct (for every seed)."""
    correct = np.zeros(len(ids), dtype=bool)
    correct[:right] = True
    return registry.TaskEvidence(task, "classification", "acc", tuple(ids), {s: {"correct": correct} for s in seeds})


def _evaluation(right: int, arp: float, *, baseline_arp: float = 0.0, **kw) -> registry.Evaluation:
    tasks = {t: _task(t, right, **kw) for t in ("scene", "crops")}
    return registry.Evaluation("gfm", {"gfm": arp, "imagenet": baseline_arp}, "imagenet",
                               {"scene": 50.0, "crops": 40.0}, tasks)






def _register_and_promote(path, evaluation, cfg=None):
    """Register ``path`` and judge it on ``evaluation`` (of fine-tuning results that started from ``path``)."""
    cfg = cfg or PromoteCfg()
    evaluation = dataclasses.replace(evaluation, weights_sha256=evaluation.weights_sha256 or sha256_file(path))
    with tracking.stage_run("promote", {"seed": 1}):
        version = tracking.register_backbone(path, cfg.model_name, {"gfm.data_manifest": "abc"})
        return tracking.promote(version, None, cfg, evaluation=evaluation)


def test_arp_difference_is_the_mean_relative_gain_over_the_champion_with_a_paired_interval():
    cand = {"scene": _task("scene", 285), "crops": _task("crops", 270)}
    champ = {"scene": _task("scene", 240), "crops": _task("crops", 150)}
    diff, why = registry.arp_difference(cand, champ, n_bootstrap=200)
    assert why == []
    # accuracy 95 % vs 80 % and 90 % vs 50 %: 100 * 15 / 80 and 100 * 40 / 50 (the champion is the reference;
    # no baseline score enters, so a teacher change that moves the ImageNet baseline cannot move this)
    assert diff.diff == pytest.approx((18.75 + 80.0) / 2)
    assert 0 < diff.lo < diff.diff < diff.hi  # every paired difference favours the candidate
    same, _ = registry.arp_difference(cand, cand, n_bootstrap=50)
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)
    shuffled = {t: registry.TaskEvidence(t, e.head, e.headline, e.ids[::-1],
                                         {s: {"correct": v["correct"][::-1]} for s, v in e.stats.items()})
                for t, e in champ.items()}
    again, _ = registry.arp_difference(cand, shuffled, n_bootstrap=50)
    assert again.diff == pytest.approx(diff.diff)  # samples pair by id, not by row


def test_gate_keeps_the_champion_against_a_worse_candidate_and_moves_for_a_better_one(store):
    client = mlflow.MlflowClient()
    first, _ = tiny_backbone(store, 0, {"steps": 0})
    d1 = _register_and_promote(first, _evaluation(240, arp=10.0))
    assert d1.promoted and d1.method == "first"
    assert client.get_model_version_by_alias("gfm-foundation", "champion").version == 1

    worse, _ = tiny_backbone(store, 1, {"steps": 1})
    d2 = _register_and_promote(worse, _evaluation(210, arp=8.0))
    assert not d2.promoted and d2.method == "bootstrap" and d2.champion_version == "1"
    assert d2.arp_diff.hi < 0 and any("lower bound must exceed" in r for r in d2.reasons)
    assert client.get_model_version_by_alias("gfm-foundation", "champion").version == 1  # unchanged
    tags = client.get_model_version("gfm-foundation", d2.version).tags
    assert tags["gfm.gate"] == "refused" and tags["gfm.champion_before"] == "1"
    assert float(tags["gfm.arp_diff"]) == pytest.approx(d2.arp_diff.diff) and float(tags["gfm.arp_diff_hi"]) < 0
    assert tags["gfm.gate_method"] == "bootstrap" and tags["gfm.evidence_run_id"]

    better, obj = tiny_backbone(store, 2, {"steps": 2})
    d3 = _register_and_promote(better, _evaluation(285, arp=15.0))
    assert d3.promoted and d3.arp_diff.lo > 0
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == d3.version
    assert client.get_model_version("gfm-foundation", "1").tags["gfm.superseded_by"] == d3.version
    assert client.get_model_version("gfm-foundation", d3.version).tags["gfm.gate"] == "passed"

    # better than the champion, not better than a baseline: refused
    d4 = _register_and_promote(better, _evaluation(299, arp=15.0, baseline_arp=16.0))
    assert not d4.promoted and any("baseline imagenet" in r for r in d4.reasons)
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == d3.version

    # @champion loads the backbone, as timm and as a pyfunc, with its model card
    x = torch.randn(2, 3, 64, 64)
    expected = obj.student.encoder.eval()
    model = tracking.load_registered_backbone("models:/gfm-foundation@champion").eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), expected.forward_features(x))
        pooled = expected(x).numpy()
    feats = mlflow.pyfunc.load_model("models:/gfm-foundation@champion").predict(x.numpy())
    np.testing.assert_allclose(feats, pooled, rtol=1e-5, atol=1e-6)
    local = mlflow.artifacts.download_artifacts("models:/gfm-foundation@champion")
    card = json.loads(open(f"{local}/model_card.json").read())
    assert card["architecture"] == TINY.arch and card["normalisation"]["mean"] and card["input_size"] == [3, 64, 64]


def test_evidence_on_other_test_samples_cannot_win(store):
    first, _ = tiny_backbone(store, 0, {"steps": 0})
    assert _register_and_promote(first, _evaluation(240, arp=10.0)).promoted
    other_ids = tuple(f"other_{i:03d}" for i in range(N))
    d = _register_and_promote(first, _evaluation(299, arp=30.0, ids=other_ids))
    assert not d.promoted and any("tested on other samples" in r for r in d.reasons)
    no_evidence = registry.Evaluation("gfm", {"gfm": 50.0, "imagenet": 0.0}, "imagenet", {}, {})
    d2 = _register_and_promote(first, no_evidence)
    assert not d2.promoted and any("no evaluated task" in r for r in d2.reasons)


class RacingClient:
    """A real MlflowClient; a second promoter moves @champion while this one is deciding."""

    def __init__(self, other_version: str) -> None:
        self.client = mlflow.MlflowClient()
        self.other_version = other_version

    def __getattr__(self, name):
        return getattr(self.client, name)

    def set_model_version_tag(self, name, version, key, value):
        if key == "gfm.gate" and value == "pending":
            self.client.set_registered_model_alias(name, "champion", self.other_version)
        return self.client.set_model_version_tag(name, version, key, value)


def test_a_concurrent_promotion_aborts_without_touching_the_alias(store):
    first, _ = tiny_backbone(store, 0, {"steps": 0})
    assert _register_and_promote(first, _evaluation(240, arp=10.0)).promoted
    with tracking.stage_run("promote", {}):
        rival = tracking.register_backbone(first, "gfm-foundation", {})
        cand = tracking.register_backbone(first, "gfm-foundation", {})
    with pytest.raises(registry.RegistryConflictError, match="moved from 1 to"):
        registry.promote(RacingClient(rival), "gfm-foundation", cand,
                         dataclasses.replace(_evaluation(285, arp=15.0), weights_sha256=sha256_file(first)),
                         PromoteCfg(), n_bootstrap=50)
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == rival
    assert client.get_model_version("gfm-foundation", cand).tags["gfm.gate"] == "conflict"


def test_evidence_round_trips_without_pickles(tmp_path):
    ev = registry.Evaluation("gfm", {"gfm": 1.0}, "imagenet", {"seg": 3.0}, {
        "seg": registry.TaskEvidence("seg", "segmentation", "mIoU", ("a", "b"),
                                     {0: {"confmat": np.arange(18).reshape(2, 3, 3)}}),
    })
    back = registry.load_evidence(registry.save_evidence(ev, tmp_path / "ev"))
    assert back["seg"].ids == ("a", "b") and back["seg"].head == "segmentation"
    np.testing.assert_array_equal(back["seg"].stats[0]["confmat"], np.arange(18).reshape(2, 3, 3))
    (tmp_path / "ev" / "evidence.json").write_text("{}")
    with pytest.raises(CheckpointError, match="schema"):
        registry.load_evidence(tmp_path / "ev")


def test_must_beat_names_the_models_the_candidate_has_to_beat(store):
    path, _ = tiny_backbone(store, 0, {"steps": 0})
    ev = dataclasses.replace(_evaluation(240, arp=-5.0), arp={"gfm": -5.0, "imagenet": 0.0, "random": -12.0})
    refused = _register_and_promote(path, ev)  # default: every other evaluated model, the teacher included
    assert not refused.promoted and any("baseline imagenet" in r for r in refused.reasons)
    demo = PromoteCfg(must_beat=("random",))  # the demo's bar: its own random init, not a foreign teacher
    passed = _register_and_promote(path, ev, demo)
    assert passed.promoted and passed.baseline_arps == {"random": -12.0}
    missing = _register_and_promote(path, ev, PromoteCfg(must_beat=("mim_only",)))
    assert not missing.promoted and any("mim_only was not evaluated" in r for r in missing.reasons)


def test_compare_versions_pairs_each_version_with_the_reference(store):
    from gfm_core.registry.versions import compare_versions, render_markdown

    first, _ = tiny_backbone(store, 0, {"steps": 0})
    assert _register_and_promote(first, _evaluation(240, arp=10.0)).promoted  # v1: 80 %
    second, _ = tiny_backbone(store, 1, {"steps": 1})
    _register_and_promote(second, _evaluation(285, arp=12.0))  # v2: 95 %, promoted
    third, _ = tiny_backbone(store, 2, {"steps": 2})
    assert not _register_and_promote(third, _evaluation(210, arp=8.0)).promoted  # v3: 70 %

    rows = compare_versions("gfm-foundation", ["1", "v2", "@champion", "3"], n_bootstrap=200)
    assert [r.version for r in rows] == ["1", "2", "2", "3"] and rows[0].versus is None
    assert rows[0].scores == {"crops": pytest.approx(80.0), "scene": pytest.approx(80.0)}
    up, down = rows[1].versus, rows[3].versus
    assert up.diff == pytest.approx(100 * 15 / 80) and 0 < up.lo <= up.diff <= up.hi
    assert down.diff == pytest.approx(-100 * 10 / 80) and down.lo <= down.diff <= down.hi < 0
    scene = down.per_task["scene"]
    assert (scene.candidate, scene.reference) == (pytest.approx(70.0), pytest.approx(80.0))
    assert scene.lo <= scene.diff <= scene.hi < 0
    assert [r.gate for r in rows] == ["passed", "passed", "passed", "refused"]
    table = render_markdown(rows)
    assert "| v1 |" in table and "reference" in table and "70.0 (-10.0 [" in table and "+18.75 [" in table
    with pytest.raises(ConfigError, match="alias 'nope'"):
        compare_versions("gfm-foundation", ["1", "@nope"])
