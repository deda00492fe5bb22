"""The ImageNet baseline follows the teacher the export was distilled from (a retraining on a released teacher)."""

import json
import logging
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from gfm_core.config import BackboneSpec, TaskCfg, parse_params
from gfm_core.errors import ConfigError
from gfm_core.io import sha256_file
from gfm_core.models.loading import backbone_sha256, distilled_teacher, load_task_backbone

TASK = TaskCfg(name="t", head="classification", layout="ucmerced", root=Path("x"), img_size=32)


def _weights(path: Path, arch: str, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _export_sidecar(export: Path, teacher: dict) -> None:
    export.with_suffix(".json").write_text(json.dumps({"arch": "swin", "meta": {"teacher": teacher}}))


def test_the_derived_imagenet_model_follows_the_pretraining_export():
    params = parse_params({
        "pretrain": {"out_dir": "out/pre", "teacher": {"arch": "resnet10t", "checkpoint": "w/t.safetensors"}},
        "finetune": {"models": [{"name": "imagenet", "kind": "teacher"},
                                {"name": "pinned", "kind": "teacher", "path": "w/other.safetensors"}]},
    })
    assert params.model("imagenet").teacher_of == Path("out/pre/backbone.safetensors")
    assert params.model("imagenet").path == Path("w/t.safetensors")
    assert params.model("pinned").teacher_of is None  # a teacher the user named stays that teacher
    with pytest.raises(ConfigError, match="only a teacher follows"):
        parse_params({"finetune": {"models": [{"name": "r", "kind": "random", "arch": "resnet10t",
                                               "teacher_of": "out/pre/backbone.safetensors"}]}})


def test_a_released_teacher_replaces_the_params_teacher_only_with_its_recorded_bytes(tmp_path, caplog):
    old = _weights(tmp_path / "old.safetensors", "resnet10t", 0)
    new = _weights(tmp_path / "new.safetensors", "resnet14t", 1)
    export = tmp_path / "pre" / "backbone.safetensors"
    export.parent.mkdir()
    spec = BackboneSpec(name="imagenet", kind="teacher", arch="resnet10t", path=old, teacher_of=export)
    assert distilled_teacher(spec) == spec  # no export yet: the params' teacher

    _export_sidecar(export, {"arch": "resnet14t", "file": str(new), "sha256": sha256_file(new)})
    followed = distilled_teacher(spec)
    assert (followed.path, followed.arch) == (new, "resnet14t")
    assert backbone_sha256(spec) == sha256_file(new)
    loaded = load_task_backbone(spec, TASK)
    assert (loaded.sha256, loaded.arch, loaded.source) == (sha256_file(new), "resnet14t", str(new))

    _export_sidecar(export, {"arch": "resnet10t", "file": str(old), "sha256": sha256_file(old)})
    assert distilled_teacher(spec) == spec  # distilled from the params' teacher: nothing to follow

    _export_sidecar(export, {"arch": "resnet14t", "file": str(new), "sha256": "0" * 64})  # the file changed since
    with caplog.at_level(logging.WARNING):
        assert distilled_teacher(spec) == spec
    assert "which is not there with those bytes" in caplog.text and "new.safetensors" in caplog.text

    pinned = spec.model_copy(update={"teacher_of": None})
    _export_sidecar(export, {"arch": "resnet14t", "file": str(new), "sha256": sha256_file(new)})
    assert distilled_teacher(pinned) == pinned and backbone_sha256(pinned) == sha256_file(old)


def test_a_run_on_a_followed_teacher_reloads_from_what_it_started_from(tmp_path, tmp_path_factory):
    from gfm_core.config import DemoDataCfg
    from gfm_core.demo.build import build_demo_data
    from gfm_core.inference.finetuned import load_finetuned
    from gfm_core.stages.finetune import run_finetune_task

    root = tmp_path_factory.mktemp("demo")
    build_demo_data(DemoDataCfg(root=root))
    old = _weights(tmp_path / "old.safetensors", "resnet10t", 0)
    new = _weights(tmp_path / "new.safetensors", "resnet14t", 1)
    seg = {"name": "segmentation", "head": "segmentation", "layout": "folders", "root": str(root / "tasks" /
           "segmentation"), "img_size": 32, "bands": [3, 2, 1], "value_range": [0, 255],
           "mask_values": [1, 2, 3, 4, 5, 6, 7]}
    params = parse_params({
        "pretrain": {"out_dir": str(tmp_path / "pre"), "teacher": {"arch": "resnet10t", "checkpoint": str(old)}},
        "finetune": {"tasks": [seg], "models": [{"name": "imagenet", "kind": "teacher"}], "seeds": [0],
                     "batch_size": 16, "max_steps": 2, "decoder_dim": 8, "device": "cpu", "num_workers": 0,
                     "precision": "fp32", "out_dir": str(tmp_path / "ft")},
        "evaluate": {"models": ["imagenet"], "out_dir": str(tmp_path / "eval")},
    })
    export = tmp_path / "pre" / "backbone.safetensors"
    export.parent.mkdir()
    _export_sidecar(export, {"arch": "resnet14t", "file": str(new), "sha256": sha256_file(new)})
    res = run_finetune_task(params, "segmentation", "imagenet", 0)
    assert res.backbone["sha256"] == sha256_file(new) and res.backbone["arch"] == "resnet14t"
    # a later pretraining on the params' teacher: the export now names the old teacher, the run still reloads
    _export_sidecar(export, {"arch": "resnet10t", "file": str(old), "sha256": sha256_file(old)})
    loaded, _ = load_finetuned(res.out_dir, params)
    assert loaded.info["backbone_sha256"] == sha256_file(new) and loaded.info["arch"] == "resnet14t"
