"""MLflow registry and the promotion gate, on a real sqlite store in tmp_path."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import torch
from helpers.registry import tiny_backbone

from gfm_core import tracking
from gfm_core.config import PromoteCfg
from gfm_core.io import sha256_file


def _register(path, name="gfm-foundation"):
    with tracking.stage_run("promote", {"seed": 1}):
        return tracking.register_backbone(path, name, {"gfm.data_manifest": "abc"})


def _report(path, **arp):
    """A report whose candidate ``gfm`` was fine-tuned from ``path``."""
    return SimpleNamespace(arp=arp, missing=[], backbones={"gfm": sha256_file(path)})


def test_gate_refuses_a_worse_candidate_and_keeps_the_champion(store):
    cfg = PromoteCfg()
    first, obj = tiny_backbone(store, 0)
    v1 = _register(first)
    d1 = tracking.promote(v1, _report(first, gfm=5.0, imagenet=0.0, random=-3.0), cfg)
    assert d1.promoted and d1.champion_version is None
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == v1

    worse, _ = tiny_backbone(store, 1)
    v2 = _register(worse)
    d2 = tracking.promote(v2, _report(worse, gfm=3.0, imagenet=0.0, random=-3.0), cfg)
    assert not d2.promoted and d2.champion_arp == 5.0
    assert any("champion" in r for r in d2.reasons)
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == v1  # unchanged
    tags = client.get_model_version("gfm-foundation", v2).tags
    assert tags["gfm.gate"] == "refused" and tags["gfm.arp"] == "3" and tags["gfm.champion_before"] == v1

    v3 = _register(worse)
    d3 = tracking.promote(v3, _report(worse, gfm=9.0, imagenet=10.0), cfg)  # beats the champion, not a baseline
    assert not d3.promoted and any("baseline imagenet" in r for r in d3.reasons)

    model = tracking.load_registered_backbone("models:/gfm-foundation@champion")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), obj.student.encoder.eval().forward_features(x))


def test_incomplete_evaluation_is_refused(store):
    path, _ = tiny_backbone(store, 2)
    v = _register(path)
    report = SimpleNamespace(arp={"gfm": 5.0, "imagenet": 0.0}, missing=["superres/mim_only/seed_0"],
                             backbones={"gfm": sha256_file(path)})
    d = tracking.promote(v, report, PromoteCfg())
    assert not d.promoted and "incomplete" in d.reasons[0]


def test_per_step_metrics_reach_the_run(store):
    with tracking.stage_run("pretrain", {"pretrain": {"alpha": 1.0}}) as run_id:
        cbs = tracking.callbacks()
        assert len(cbs) == 1
        for step in (1, 2):
            cbs[0].on_log(step, {"loss": 1.0 / step, "lr": 1e-4})
    hist = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5)]
    assert mlflow.get_run(run_id).data.params["pretrain.alpha"] == "1.0"
    assert tracking.callbacks() == []  # outside a run: untracked


def test_card_markdown_tables_the_evaluation_and_keeps_bulky_stats_last():
    from gfm_core.tracking.card import card_markdown

    card = {"architecture": "swin", "pile_norm_stats": {"a": [1, 2]}, "limitations": "RGB only",
            "evaluation": {"headlines": {"scene": "acc", "seg": "mIoU"},
                           "scores": {"gfm": {"scene": 0.5, "seg": None}, "random": {"scene": 0.25, "seg": 0.125}}}}
    md = card_markdown(card, "m")
    assert "| model | scene acc | seg mIoU |" in md and "| gfm | 0.5 | - |" in md and "| random | 0.25 | 0.125 |" in md
    assert md.index("**limitations**") < md.index("**pile_norm_stats**")
