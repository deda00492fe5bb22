"""Fine-tuning through the one loop on the real demo tasks, backbone sources, and the stage entry points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from gfm_core import stages, tracking
from gfm_core.config import (
    BackboneSpec,
    DemoDataCfg,
    FinetuneCfg,
    PretrainCfg,
    StudentCfg,
    TaskCfg,
    parse_params,
)
from gfm_core.data.tasks.dataset import TaskDataset
from gfm_core.demo.build import build_demo_data
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.evaluation.geobench import read_csv
from gfm_core.evaluation.metrics import build_metrics
from gfm_core.evaluation.report import evaluate_results, run_evaluation
from gfm_core.evaluation.results import load_result, load_scores
from gfm_core.models.heads import build_task_model
from gfm_core.models.loading import load_task_backbone
from gfm_core.objectives import Finetune
from gfm_core.stages.finetune import finetune, run_finetune_task
from gfm_core.task_heads import HEADS

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4)
STEPS = 60
DEMO_TASK = {  # head -> demo task (the preset's settings, minus the root)
    "classification": dict(name="scene", layout="ucmerced", bands=(3, 2, 1), value_range=(0, 255)),
    "multilabel": dict(name="multilabel", layout="bigearthnet", value_range=(0, 255)),
    "segmentation": dict(
        name="segmentation",
        layout="folders",
        bands=(3, 2, 1),
        value_range=(0, 255),
        mask_values=(1, 2, 3, 4, 5, 6, 7),
    ),
    "change": dict(name="change", layout="levircd"),
    "superres": dict(name="superres", layout="folders", bands=(3, 2, 1), value_range=(0, 255), scale=4),
}


@pytest.fixture(scope="session")
def demo_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo_data(DemoDataCfg(root=root))
    return root / "tasks"


def _task(tasks: Path, head: str) -> TaskCfg:
    kw = dict(DEMO_TASK[head])
    return TaskCfg(head=head, root=tasks / kw["name"], img_size=32, **kw)


def _cfg(out: Path, **kw) -> FinetuneCfg:
    base = dict(
        batch_size=16,
        eval_batch_size=32,
        epochs=100,
        max_steps=STEPS,
        base_lr=0.064,
        warmup_lr=0.0032,
        min_lr=0.0032,
        drop_path_rate=0.0,
        decoder_dim=16,
        precision="fp32",
        device="cpu",
        num_workers=0,
        cache_samples=True,
        log_every=20,
        out_dir=out,
    )
    return FinetuneCfg(**{**base, **kw})


RANDOM_TINY = BackboneSpec(name="gfm", kind="random", arch=SWIN, timm_kwargs=TINY)


def _chance(head: str, task: TaskCfg) -> float:
    """The metric of a model that ignores the image (see each branch)."""
    mean, std = (0.0,) * 3, (1.0,) * 3
    train = TaskDataset(task, "train", mean=mean, std=std)
    test = TaskDataset(task, "test", mean=mean, std=std)
    if head == "classification":  # uniform guessing
        return 100 / train.num_outputs
    if head == "multilabel":  # AP of random scores = label prevalence
        return 100 * float(np.mean([test[i]["label"].numpy() for i in range(len(test))]))
    if head == "segmentation":  # the most frequent training class everywhere
        counts = np.bincount(np.concatenate([train._raw(i)["mask"].ravel() for i in range(len(train))]))
        majority = int(np.argmax(counts[: train.num_outputs]))
        m = build_metrics("segmentation", train.num_outputs, task.ignore_index)
        for i in range(len(test)):
            mask = test[i]["mask"][None]
            m.update(torch.full_like(mask, majority), mask)
        return m.compute()["mIoU"]
    if head == "change":  # "everything changed": F1 = 2p / (1 + p)
        p = float(np.mean([test[i]["mask"].float().mean().item() for i in range(len(test))]))
        return 100 * 2 * p / (1 + p)
    # superres: the training mean image, a constant
    level = torch.stack([train[i]["target"].mean((1, 2)) for i in range(len(train))]).mean(0)
    m = build_metrics("superres", 3)
    for i in range(len(test)):
        target = test[i]["target"][None]
        m.update(level.view(1, 3, 1, 1).expand_as(target), target)
    return m.compute()["PSNR"]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_head_trains_off_chance_on_its_demo_task(head, demo_tasks, tmp_path):
    task = _task(demo_tasks, head)
    # scene's 21 test tiles come from other blocks than its 68 (forest-heavy) training tiles, so one run
    # swings by a few tiles: its check uses the mean of three seeds
    seeds = (0, 1, 2) if head == "classification" else (0,)
    runs = [finetune(_cfg(tmp_path), task, RANDOM_TINY, seed=s, out_dir=tmp_path / f"run{s}") for s in seeds]
    res = runs[0]
    assert res.steps == STEPS and res.train_samples == 68 and res.test_samples == 21
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < first, res.history
    chance = _chance(head, task)
    margin = {
        "classification": 0.0,
        "multilabel": 10.0,
        "segmentation": 2.0,
        "change": 10.0,
        "superres": 1.0,
    }[head]
    score = float(np.mean([r.score for r in runs]))
    assert score > chance + margin, ([r.metrics for r in runs], chance)
    # per-sample statistics reproduce the metric (the bootstrap depends on it)
    ids, _ = load_scores(res.scores)
    assert len(ids) == 21 and len(set(ids)) == 21
    assert load_result(res.out_dir) == res
    assert (res.out_dir / "metrics.jsonl").is_file()


def test_finetune_objective_contract_and_predictions(demo_tasks):
    task = _task(demo_tasks, "segmentation")
    loaded = load_task_backbone(RANDOM_TINY, task)
    ds = TaskDataset(task, "train", mean=loaded.mean, std=loaded.std)
    model = build_task_model("segmentation", loaded.model, num_outputs=ds.num_outputs, decoder_dim=8)
    objective = Finetune(model)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    out = objective(batch)
    assert set(out) == {"loss"} and out["loss"].ndim == 0 and out["loss"].requires_grad
    pred = objective.predict(batch)
    assert pred.shape == batch["mask"].shape and pred.dtype == torch.long


def _export_tiny_swin(path: Path, img_size: int = 64, window_size: int = 4, seed: int = 0) -> Path:
    from gfm_core.objectives import build_continual_pretrain, export_backbone

    torch.manual_seed(seed)
    student = StudentCfg(
        arch=SWIN,
        img_size=img_size,
        window_size=window_size,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
    )
    objective = build_continual_pretrain(PretrainCfg(student=student, alpha=0.0, mask_patch_size=32))
    return export_backbone(objective, path)


def test_export_loads_at_another_image_and_window_size(tmp_path, demo_tasks):
    from timm.layers import resize_rel_pos_bias_table

    path = _export_tiny_swin(tmp_path / "backbone.safetensors")
    src = {k: v for k, v in __import__("safetensors.torch").torch.load_file(str(path)).items()}
    spec = BackboneSpec(name="gfm", kind="export", path=path)
    same = load_task_backbone(
        spec,
        TaskCfg(name="s", head="classification", layout="ucmerced", root=demo_tasks / "scene", img_size=64),
    )
    for k, v in same.model.state_dict().items():
        if k in src:
            assert torch.equal(v, src[k]), k
    assert same.mean == pytest.approx((0.485, 0.456, 0.406))
    # 32 px with window 2: every table is resampled 7x7 -> 3x3 (timm's torch interpolation, no SciPy)
    task = TaskCfg(
        name="s",
        head="classification",
        layout="ucmerced",
        root=demo_tasks / "scene",
        img_size=32,
        window_size=2,
    )
    other = load_task_backbone(spec, task).model
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert src[key].shape == (49, 1) and other.state_dict()[key].shape == (9, 1)
    expected = resize_rel_pos_bias_table(src[key], new_window_size=(2, 2), new_bias_shape=(9, 1))
    torch.testing.assert_close(other.state_dict()[key], expected)
    assert other.patch_embed.img_size == (32, 32)
    model = build_task_model("classification", other, num_outputs=3)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_teacher_and_random_sources(tmp_path, demo_tasks):
    torch.manual_seed(0)
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in lite.state_dict().items()}, str(tmp_path / "lite0.safetensors"))
    task = _task(demo_tasks, "classification")
    teacher = load_task_backbone(
        BackboneSpec(
            name="imagenet", kind="teacher", arch="tf_efficientnet_lite0", path=tmp_path / "lite0.safetensors"
        ),
        task,
    )
    assert teacher.mean == pytest.approx((0.5, 0.5, 0.5)) and teacher.source.endswith("lite0.safetensors")
    assert torch.equal(teacher.model.state_dict()["conv_stem.weight"], lite.state_dict()["conv_stem.weight"])
    with pytest.raises(ConfigError, match="window_size is set but the backbone takes no window size"):
        load_task_backbone(
            BackboneSpec(
                name="imagenet",
                kind="teacher",
                arch="tf_efficientnet_lite0",
                path=tmp_path / "lite0.safetensors",
            ),
            task.model_copy(update={"window_size": 2}),
        )
    rnd = load_task_backbone(RANDOM_TINY, task)
    assert rnd.source == "random" and rnd.model.patch_embed.img_size == (32, 32)
    missing = BackboneSpec(
        name="mim_only",
        kind="export",
        path=tmp_path / "nope" / "backbone.safetensors",
        ablation="mim_only",
    )
    with pytest.raises(
        CheckpointError,
        match=r"nope/backbone\.safetensors: backbone export of model 'mim_only' not "
        r"found; produce it with `gfm pretrain --ablation mim_only`",
    ):
        load_task_backbone(missing, task)


def _params(tmp_path: Path, demo_tasks: Path, export: Path, **sections: dict) -> object:
    tasks = [
        {
            "head": head,
            "root": str(demo_tasks / DEMO_TASK[head]["name"]),
            "img_size": 32,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_TASK[head].items()},
        }
        for head in ("classification", "change")
    ]
    raw = {
        "finetune": {
            "tasks": tasks,
            "models": [
                {"name": "gfm", "kind": "export", "path": str(export)},
                {"name": "imagenet", "kind": "random", "arch": SWIN, "timm_kwargs": TINY},
            ],
            "ablations": ["mim_only"],
            "seeds": [0],
            "batch_size": 16,
            "max_steps": 2,
            "decoder_dim": 8,
            "device": "cpu",
            "num_workers": 0,
            "precision": "fp32",
            "out_dir": str(tmp_path / "ft"),
        },
        "evaluate": {"models": ["gfm", "imagenet"], "n_bootstrap": 20, "out_dir": str(tmp_path / "eval")},
        "pretrain": {"out_dir": str(tmp_path / "pre"), "ablations": {"mim_only": {"alpha": 0.0}}},
    }
    for key, section in sections.items():
        raw[key] = {**raw.get(key, {}), **section}
    return parse_params(raw)


def test_stage_functions_finetune_and_evaluate(tmp_path, demo_tasks):
    export = _export_tiny_swin(tmp_path / "gfm" / "backbone.safetensors", img_size=64)
    params = _params(tmp_path, demo_tasks, export)
    with pytest.raises(ConfigError, match="unknown task 'ucm'; valid: scene, change"):
        run_finetune_task(params, "ucm", "gfm", 0)
    with pytest.raises(ConfigError, match="unknown model 'seco'; valid: gfm, imagenet, mim_only"):
        run_finetune_task(params, "scene", "seco", 0)
    results = []
    for task in ("scene", "change"):
        for model in ("gfm", "imagenet"):
            res = run_finetune_task(params, task, model, 0)
            results.append(res)
            assert (
                res.steps == 2
                and res.result_json == tmp_path / "ft" / task / model / "seed_0" / "result.json"
            )
            led = json.loads(res.result_json.read_text())["compute"]  # the run's compute ledger, in result.json
            assert led["steps"] == 2 and led["flops"] == 2 * led["flops_per_step"] > 0 and led["co2_kg"] > 0
    report = run_evaluation(params)
    assert report.models == ["gfm", "imagenet", "trivial"] and report.tasks == ["scene", "change"]
    assert set(report.ci["trivial"]) == {"scene", "change"}  # the trivial predictor of each task, paired too
    assert report.arp["imagenet"] == 0.0 and set(report.ci["imagenet"]) == {"scene", "change"}
    for p in report.paths.values():
        assert p.is_file()
    assert json.loads(report.paths["json"].read_text())["columns"][:2] == ["scene/acc", "change/F1"]
    direct = evaluate_results(results, baseline="imagenet", reference="gfm", n_bootstrap=20)
    assert direct.mean == {m: report.mean[m] for m in direct.models}
    assert direct.arp == {m: report.arp[m] for m in direct.models}
    # the GEO-Bench-2 aggregation beside ARP: the protocol, the leaderboard CSV, the IQM table
    assert (report.protocol, report.scoring) == ("finetune", "test")
    rows = read_csv(report.paths["leaderboard_csv"])
    assert rows == report.leaderboard and len(rows) == 2 * 3  # tasks x (2 models + trivial) x 1 seed
    ft = params.finetune
    gfm = {r.dataset: r for r in rows if r.backbone == "gfm"}
    assert (gfm["scene"].decoder, gfm["change"].decoder, gfm["scene"].frozen_or_full_ft) == ("linear", "FPN", "full_ft")
    assert (gfm["scene"].batch_size, gfm["scene"].lr, gfm["scene"].weight_decay) == (16, ft.base_lr, ft.weight_decay)
    assert gfm["scene"].test_metric == report.cell("gfm", "scene")
    assert {(r.decoder, r.protocol, r.batch_size) for r in rows if r.backbone == "trivial"} == {("", "", None)}
    assert [r.model for r in report.iqm] == ["gfm", "imagenet", "trivial"]
    md = report.paths["markdown"].read_text()
    assert "Protocol: finetune, scoring: test" in md and "## GEO-Bench-2 aggregation" in md and "Weak intervals" in md
    assert set(json.loads(report.paths["json"].read_text())["iqm"]) == {"gfm", "imagenet", "trivial"}
    assert direct.leaderboard[0].batch_size is None  # no params: the training columns stay empty
    # a missing result is an error naming it, unless require_complete is off
    incomplete = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"models": ("gfm", "imagenet", "mim_only")})}
    )
    with pytest.raises(CheckpointError, match=r"mim_only/seed_0/result\.json \(task scene, model mim_only"):
        run_evaluation(incomplete)
    lenient = incomplete.model_copy(
        update={"evaluate": incomplete.evaluate.model_copy(update={"require_complete": False})}
    )
    assert len(run_evaluation(lenient).missing) == 2


def test_promotion_binds_to_the_backbone_bytes_that_were_fine_tuned(tmp_path, demo_tasks):
    """`gfm finetune`, `gfm evaluate`, then `gfm pretrain` rewrites the backbone: nothing may judge the new bytes
    on the old bytes' results (evaluation, promotion, a resumed fine-tuning)."""
    import mlflow

    from gfm_core import stages
    from gfm_core.errors import DataValidationError
    from gfm_core.io import sha256_file

    export = _export_tiny_swin(tmp_path / "gfm" / "backbone.safetensors", img_size=64)
    params = _params(
        tmp_path, demo_tasks, export, finetune={"seeds": [0, 1], "max_steps": 1},
        evaluate={"models": ["gfm"], "tasks": ["scene"], "baseline": "gfm", "reference": "gfm", "trivial": False},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifacts": str(tmp_path / "artifacts"),
                  "experiment": "t"},
        ingest={"root": str(demo_tasks.parent / "pile"), "out_dir": str(tmp_path / "geopile")},  # model card
    )
    old = sha256_file(export)
    assert [run_finetune_task(params, "scene", "gfm", s).backbone_sha256 for s in (0, 1)] == [old, old]
    assert run_evaluation(params).backbones == {"gfm": old}

    _export_tiny_swin(export, img_size=64, seed=1)  # `gfm pretrain`: new weights at the same path
    new = sha256_file(export)
    assert new != old
    with pytest.raises(CheckpointError, match=r"started from backbone sha256 .*re-run `gfm finetune --model gfm` "
                                              r"without resume"):
        run_finetune_task(params, "scene", "gfm", 0, resume=True)
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri, registry_uri=params.tracking.uri)
    try:
        with pytest.raises(ConfigError, match="promotion runs inside an MLflow run"):
            stages.run_promote(params)
        with tracking.stage_run("promote", {}):
            stale = stages.run_promote(params)
        assert not stale.promoted
        assert any(f"holds backbone sha256 {new}, but the evaluation judged fine-tuning results of sha256 {old}" in r
                   and "re-run `gfm finetune --model gfm` and `gfm evaluate`" in r for r in stale.reasons)
        assert client.get_model_version("gfm-foundation", stale.version).tags["gfm.gate"] == "refused"
        assert client.get_registered_model("gfm-foundation").aliases == {}

        run_finetune_task(params, "scene", "gfm", 1)  # one seed on the new bytes: the results now mix two
        with pytest.raises(DataValidationError, match=r"(?s)model gfm: its fine-tuning results started from "
                           r"different backbone bytes.*seed_0/result\.json.*seed_1/result\.json.*re-run "
                           r"`gfm finetune --model gfm`"):
            run_evaluation(params)
        run_finetune_task(params, "scene", "gfm", 0)
        with tracking.stage_run("promote", {}):
            fresh = stages.run_promote(params)
        assert fresh.promoted, fresh.reasons
        assert client.get_model_version("gfm-foundation", fresh.version).tags["gfm.weights_sha256"] == new
    finally:
        mlflow.set_tracking_uri(None)


def test_ablations_are_config_with_derived_folders(tmp_path, demo_tasks):
    params = _params(tmp_path, demo_tasks, tmp_path / "x.safetensors")
    mim = stages.ablation_params(params, "mim_only")
    assert mim.pretrain.alpha == 0.0 and mim.pretrain.out_dir == tmp_path / "pre_mim_only"
    assert params.pretrain.alpha == 1.0 and stages.ablation_params(params, None) is params
    # the ablation's model is derived: fine-tuned under its name, from the folder its pretraining writes
    assert params.model("mim_only").path == tmp_path / "pre_mim_only" / "backbone.safetensors"
    with pytest.raises(ConfigError, match="unknown ablation 'gfm'; valid: mim_only"):
        stages.ablation_params(params, "gfm")
    with pytest.raises(ConfigError, match=r"pretrain.ablations.bad: 1 invalid value\(s\)\n  alpha:"):
        parse_params({"pretrain": {"ablations": {"bad": {"alpha": -1}}}}).pretrain.ablation("bad")
    with pytest.raises(ConfigError, match=r"finetune.ablations: \['nope'\] not in pretrain.ablations"):
        parse_params({"finetune": {"ablations": ["nope"]}})


def test_get_task_from_the_repo_params(repo_root):
    from gfm_core.config import load_params

    demo = load_params(repo_root / "params.yaml", preset="demo")
    assert [t.name for t in demo.finetune.tasks] == [
        "scene",
        "multilabel",
        "segmentation",
        "change",
        "superres",
    ]
    assert {m.name for m in demo.finetune.models} == {"gfm", "imagenet", "random"}
    paper = load_params(repo_root / "params.yaml", preset="")
    assert paper.task("ben1").label_fraction == 0.01 and paper.finetune.layer_decay == 0.9
    # models without weights named are the pretraining's own: its export, its teacher, its student's architecture
    assert paper.model("imagenet").path == paper.pretrain.teacher.checkpoint
    assert paper.model("random").arch == paper.pretrain.student.arch
    assert [m.name for m in paper.finetune.models][3:] == ["mim_only", "distill_only"]
    assert demo.model("random").timm_kwargs == {"embed_dim": 32, "depths": (2, 2, 4, 2), "num_heads": (1, 2, 4, 8),
                                                "window_size": 4}


def test_finetuning_runs_on_the_deepspeed_engine_too(demo_tasks, tmp_path):
    """The shared run setup: `finetune.backend: deepspeed` fine-tunes through a real DeepSpeed engine (gloo, CPU)
    and scores the same test split as the torch backend."""
    task = _task(demo_tasks, "classification")
    res = finetune(_cfg(tmp_path, backend="deepspeed", max_steps=4), task, RANDOM_TINY, seed=0, out_dir=tmp_path / "ds")
    torch_res = finetune(_cfg(tmp_path, max_steps=4), task, RANDOM_TINY, seed=0, out_dir=tmp_path / "torch")
    assert res.steps == 4 and res.test_samples == torch_res.test_samples == 21
    assert (tmp_path / "ds" / "checkpoints").is_dir() and load_result(res.out_dir).metrics == res.metrics
    assert res.history[0]["loss"] == pytest.approx(torch_res.history[0]["loss"], rel=1e-4)  # same start, same data
