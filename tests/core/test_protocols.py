"""Fine-tuning protocols (full, frozen backbone, linear probe) and the paper's scoring (best val epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gfm_core.config import BackboneSpec, FinetuneCfg, TaskCfg, parse_params
from gfm_core.data.tasks.dataset import TaskDataset
from gfm_core.errors import ConfigError
from gfm_core.evaluation.metrics import metrics_from_stats
from gfm_core.evaluation.results import FinetuneResult, load_result, load_scores, scores_meta
from gfm_core.evaluation.scoring import batch_averaged_map, best_record
from gfm_core.models.heads import build_task_model
from gfm_core.models.loading import load_task_backbone
from gfm_core.objectives.protocols import build_objective
from gfm_core.stages.finetune import finetune
from gfm_core.training.checkpoint import latest_checkpoint, seed_everything
from tests.core import test_finetune
from tests.core.test_finetune import RANDOM_TINY, _cfg, _task

demo_tasks = test_finetune.demo_tasks  # the fine-tuning tests' fixture: the demo's five tasks

CNN = BackboneSpec(name="cnn", kind="random", arch="resnet10t")  # BatchNorm everywhere: running stats are buffers
BACKBONE = "model.backbone.model."


def _initial(cfg: FinetuneCfg, task: TaskCfg, spec: BackboneSpec, seed: int) -> dict[str, torch.Tensor]:
    """The objective's state at step 0, rebuilt the way finetune() seeds it (backbone, then head)."""
    seed_everything(seed)
    loaded = load_task_backbone(spec, task, drop_path_rate=cfg.drop_path_rate)
    n = TaskDataset(task, "train", mean=loaded.mean, std=loaded.std).num_outputs
    seed_everything(seed)
    model = build_task_model(task.head, loaded.model, num_outputs=n, decoder_dim=cfg.decoder_dim,
                             ignore_index=task.ignore_index, mean=loaded.mean, std=loaded.std)
    return {f"model.{k}": v.clone() for k, v in model.state_dict().items()}


def _final(out_dir: Path) -> dict:
    ckpt = latest_checkpoint(out_dir)
    assert ckpt is not None
    return torch.load(ckpt / "state.pt", weights_only=True)  # our checkpoints load without unpickling code


@pytest.mark.parametrize(("protocol", "spec", "head"), [
    ("frozen", CNN, "segmentation"),
    ("linear", CNN, "classification"),
    ("frozen", RANDOM_TINY, "multilabel"),
    ("finetune", CNN, "classification"),
])
def test_a_frozen_backbone_stays_bit_identical_while_the_head_trains(protocol, spec, head, demo_tasks, tmp_path):
    task = _task(demo_tasks, head)
    cfg = _cfg(tmp_path, protocol=protocol, max_steps=3, drop_path_rate=0.1, log_every=1)
    res = finetune(cfg, task, spec, seed=0, out_dir=tmp_path / "run")
    before, state = _initial(cfg, task, spec, 0), _final(res.out_dir)
    after = state["model"]
    backbone = sorted(k for k in after if k.startswith(BACKBONE))
    assert backbone and set(backbone) <= set(before)
    assert any("running_mean" in k for k in backbone) == (spec is CNN)  # BatchNorm buffers are compared too
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    head_changed = [k for k in after if k.startswith("model.head.") and not torch.equal(before[k], after[k])]
    assert head_changed
    n_trained = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    n_head = sum(1 for k in after if k.startswith("model.head.") and "running" not in k and "batches" not in k)
    if protocol == "finetune":  # the check can fail: full fine-tuning moves weights and BatchNorm statistics
        assert any("running_mean" in k for k in changed) and any(k.endswith(".weight") for k in changed)
        assert n_trained > n_head
    else:
        assert changed == []
        assert n_trained == n_head  # the optimizer holds the head's parameters only
    if protocol == "linear":  # pooled features -> one linear layer
        assert sorted(k[len("model.head."):] for k in after if k.startswith("model.head.")) == ["fc.bias", "fc.weight"]
    assert (res.protocol, res.scoring, res.best_step) == (protocol, "test", None)
    assert json.loads(res.result_json.read_text())["protocol"] == protocol


def test_the_frozen_objective_keeps_the_backbone_in_eval_mode_and_out_of_autograd(demo_tasks):
    task = _task(demo_tasks, "classification")
    loaded = load_task_backbone(CNN, task, drop_path_rate=0.1)
    objective = build_objective(build_task_model("classification", loaded.model, num_outputs=4), "frozen")
    objective.train()
    assert objective.training and objective.model.head.training
    assert not any(m.training for m in objective.model.backbone.modules())
    assert not any(p.requires_grad for p in objective.model.backbone.parameters())
    feats = objective.model.backbone(torch.randn(2, 3, 32, 32))
    assert not any(f.requires_grad for f in feats)  # no graph through the backbone, as under no_grad


def test_linear_refuses_dense_heads_at_config_time_and_at_run_time(demo_tasks):
    raw = {"finetune": {"protocol": "linear", "tasks": [
        {"name": "ucm", "head": "classification", "layout": "ucmerced", "root": "x", "img_size": 32},
        {"name": "whu", "head": "segmentation", "layout": "folders", "root": "x", "img_size": 32, "num_classes": 2},
    ]}}
    with pytest.raises(ConfigError, match=r"finetune\.protocol: linear .* task\(s\) whu \(segmentation\) need a "
                                          r"dense head: use protocol frozen"):
        parse_params(raw)
    raw["finetune"]["tasks"][1]["protocol"] = "frozen"  # a per-task override makes the set valid
    params = parse_params(raw)
    assert [params.finetune.protocol_of(t) for t in params.finetune.tasks] == ["linear", "frozen"]
    with pytest.raises(ConfigError, match=r"finetune\.tasks\[whu\]\.protocol: linear"):
        parse_params({"finetune": {"tasks": [{**raw["finetune"]["tasks"][1], "protocol": "linear"}]}})
    seg = build_task_model("segmentation", load_task_backbone(RANDOM_TINY, _task(demo_tasks, "segmentation")).model,
                           num_outputs=7, decoder_dim=8)
    with pytest.raises(ConfigError, match=r"task 'segmentation': protocol linear is a linear probe .* use "
                                          r"protocol frozen"):
        build_objective(seg, "linear")


def test_paper_scoring_reports_the_best_val_epoch(demo_tasks, tmp_path):
    task = _task(demo_tasks, "classification")  # 68 train samples, batch 16: 4 steps an epoch
    res = finetune(_cfg(tmp_path, scoring="paper", max_steps=10), task, RANDOM_TINY, seed=0, out_dir=tmp_path / "p")
    records = [json.loads(line) for line in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_acc" in r]
    assert [r["step"] for r in val] == [4, 8, 10]  # after every epoch, and at the last step
    best = best_record(val, "acc")
    assert best is not None and best["val_acc"] == max(r["val_acc"] for r in val)
    assert res.metrics == {k[4:]: v for k, v in best.items() if k.startswith("val_")} and res.best_step == best["step"]
    assert [h["step"] for h in res.history if "val_acc" in h] == [4, 8, 10]
    # the val split was scored, not test: its samples and per-sample statistics
    val_ids = [TaskDataset(task, "val", mean=(0,) * 3, std=(1,) * 3).refs[i].id for i in range(21)]
    ids, stats = load_scores(res.scores)
    assert res.test_samples == 21 and sorted(ids) == sorted(val_ids)
    assert scores_meta(res.scores)["split"] == "val" and scores_meta(res.scores)["step"] == res.best_step
    assert metrics_from_stats("classification", stats)["acc"] == pytest.approx(res.metrics["acc"])
    saved = json.loads(res.result_json.read_text())
    assert (saved["protocol"], saved["scoring"], saved["best_step"]) == ("finetune", "paper", res.best_step)
    assert load_result(res.out_dir) == res
    # a resumed (finished) run reports the same best epoch from metrics.jsonl and the scores it wrote
    again = finetune(_cfg(tmp_path, scoring="paper", max_steps=10), task, RANDOM_TINY, seed=0, out_dir=res.out_dir,
                     resume=True)
    assert (again.metrics, again.best_step) == (res.metrics, res.best_step)
    assert not any("loss" in h for h in again.history)  # it trained no further step: the scores are read back
    # scoring val during training leaves training's random stream alone: same losses as scoring: test
    plain = finetune(_cfg(tmp_path, max_steps=10), task, RANDOM_TINY, seed=0, out_dir=tmp_path / "t")
    assert [h["loss"] for h in res.history if "loss" in h] == [h["loss"] for h in plain.history]
    assert plain.scoring == "test" and plain.best_step is None


def test_paper_scoring_of_multilabel_records_the_papers_per_batch_map(demo_tasks, tmp_path):
    task = _task(demo_tasks, "multilabel")
    res = finetune(_cfg(tmp_path, scoring="paper", max_steps=4, eval_batch_size=8), task, RANDOM_TINY, seed=0,
                   out_dir=tmp_path / "p")
    _, stats = load_scores(res.scores)
    assert res.metrics["mAP"] == pytest.approx(metrics_from_stats("multilabel", stats)["mAP"])  # pooled headline
    assert res.metrics["mAP_batch"] == pytest.approx(batch_averaged_map(stats, 8))
    assert res.metrics["mAP_batch"] != pytest.approx(res.metrics["mAP"])


def test_batch_averaged_map_by_hand():
    # batch 1 pools (0.9:1, 0.1:0, 0.8:0, 0.2:1): AP = (1/1 + 2/3) / 2; batch 2: its one positive ranks first
    stats = {"scores": torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]).numpy(),
             "targets": torch.tensor([[1, 0], [0, 1], [0, 1]]).numpy()}
    assert batch_averaged_map(stats, 2) == pytest.approx((2 * 100 * 5 / 6 + 100) / 3)


def test_paper_scoring_needs_a_val_split(tmp_path):
    oscd = TaskCfg(name="oscd", head="change", layout="oscd", root=tmp_path, img_size=32)
    with pytest.raises(ConfigError, match=r"task 'oscd' \(oscd layout\) has no val split, which finetune.scoring: "
                                          r"paper scores; use scoring: test"):
        finetune(_cfg(tmp_path, scoring="paper"), oscd, RANDOM_TINY, seed=0, out_dir=tmp_path / "o")


def test_results_written_before_protocols_load_with_the_defaults(tmp_path):
    old = {"task": "ucm", "head": "classification", "model": "gfm", "seed": 0, "metrics": {"acc": 90.0},
           "headline": "acc", "steps": 1, "train_samples": 1, "test_samples": 1, "seconds": 1.0, "device": "cpu",
           "out_dir": str(tmp_path), "result_json": str(tmp_path / "result.json"), "scores": "scores.parquet"}
    (tmp_path / "result.json").write_text(json.dumps(old))
    res = load_result(tmp_path)
    assert (res.protocol, res.scoring, res.best_step) == ("finetune", "test", None)
    assert FinetuneResult.from_json(res.to_json()) == res


def test_paper_scoring_every_n_steps_for_iteration_budgets(demo_tasks, tmp_path):
    task = _task(demo_tasks, "classification").model_copy(update={"eval_every": 3})  # overrides the 4-step epochs
    res = finetune(_cfg(tmp_path, scoring="paper", max_steps=7), task, RANDOM_TINY, seed=0, out_dir=tmp_path / "p")
    assert [h["step"] for h in res.history if "val_acc" in h] == [3, 6, 7]


def test_the_trivial_row_and_the_gate_follow_the_scored_split(demo_tasks):
    from types import SimpleNamespace

    from gfm_core.evaluation.trivial import trivial_scores
    from gfm_core.registry.evidence import Evaluation

    task = _task(demo_tasks, "classification")
    val_ids = {r.id for r in TaskDataset(task, "val", mean=(0,) * 3, std=(1,) * 3).refs}
    test_ids = {r.id for r in TaskDataset(task, "test", mean=(0,) * 3, std=(1,) * 3).refs}
    assert set(trivial_scores(task, [0], "val")[0].ids) == val_ids != set(trivial_scores(task, [0])[0].ids) == test_ids
    report = SimpleNamespace(models=["gfm"], pretrainings={}, scoring="paper")
    params = parse_params({"promote": {"candidate": "gfm"}})
    with pytest.raises(ConfigError, match="the gate judges test-split results"):
        Evaluation.from_report(report, params)
