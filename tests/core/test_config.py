from pathlib import Path

import pytest
import yaml

from gfm_core.config import PretrainCfg, load_params, parse_params
from gfm_core.errors import ConfigError


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repo_params_paper_defaults(repo_root):
    p = load_params(repo_root / "params.yaml", preset="")
    assert p.preset is None
    pt = p.pretrain
    assert (pt.student.img_size, pt.student.window_size, pt.teacher.img_size) == (192, 6, 224)
    assert (pt.mask_patch_size, pt.mask_ratio, pt.alpha, pt.w_mim) == (32, 0.6, 1.0, 1.0)
    assert (pt.base_lr, pt.weight_decay, pt.clip_grad, pt.epochs, pt.warmup_epochs) == (2e-4, 0.05, 5.0, 100, 10)
    assert pt.teacher.feature_stage == 3


def test_repo_params_demo_preset(repo_root):
    p = load_params(repo_root / "params.yaml")
    assert p.preset == "demo"
    assert p.pretrain.student.embed_dim == 32
    assert p.pretrain.teacher.arch == "tf_efficientnet_lite0"
    # values the preset does not touch keep the paper's
    assert p.pretrain.mask_ratio == 0.6 and p.pretrain.alpha == 1.0


def test_typo_names_file_and_key(tmp_path):
    path = _write(tmp_path, {"pretrain": {"mask_ratoi": 0.5}})
    with pytest.raises(ConfigError) as e:
        load_params(path)
    msg = str(e.value)
    assert str(path) in msg and "pretrain.mask_ratoi" in msg and "unknown key" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    path = _write(tmp_path, {"pretrain": {"backend": "horovod"}})
    with pytest.raises(ConfigError, match=r"pretrain\.backend.*'torch'.*'deepspeed'"):
        load_params(path)


def test_range_error_names_key(tmp_path):
    path = _write(tmp_path, {"pretrain": {"mask_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"pretrain\.mask_ratio: Input should be less than 1"):
        load_params(path)


def test_unknown_preset_lists_valid(tmp_path):
    path = _write(tmp_path, {"preset": "tiny", "presets": {"demo": {}, "paper": {}}})
    with pytest.raises(ConfigError, match="unknown preset 'tiny'; valid presets: demo, paper"):
        load_params(path)


def test_preset_errors_name_the_preset(tmp_path):
    path = _write(tmp_path, {"preset": "demo", "presets": {"demo": {"pretrain": {"zero_stage": 7}}}})
    with pytest.raises(ConfigError, match=r"(?s)preset .demo.*pretrain\.zero_stage"):
        load_params(path)


@pytest.mark.parametrize(
    ("student", "extra", "match"),
    [
        ({"img_size": 200}, {}, "divisible by mask_patch_size 32"),
        ({}, {"mask_patch_size": 30}, "divisible by mask_patch_size 30|divisible by student.patch_size 4"),
        ({"img_size": 224, "window_size": 5}, {"mask_patch_size": 32}, "window_size 5 must divide the stage-1 grid"),
    ],
)
def test_geometry_checks(student, extra, match):
    with pytest.raises(ConfigError, match=match):
        parse_params({"pretrain": {"student": student, **extra}})


def test_mask_patch_must_be_multiple_of_model_patch():
    with pytest.raises(ConfigError, match=r"mask_patch_size 6 must be divisible by student\.patch_size 4"):
        parse_params({"pretrain": {"student": {"img_size": 192}, "mask_patch_size": 6}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_configs_are_frozen():
    cfg = PretrainCfg()
    with pytest.raises(Exception, match="frozen"):
        cfg.alpha = 0.0  # type: ignore[misc]


def test_the_science_preset_extends_the_demo_and_keeps_its_evaluation_scenes_out_of_the_pile(repo_root):
    from gfm_core.config import load_params

    demo, science = load_params(repo_root / "params.yaml", "demo"), load_params(repo_root / "params.yaml", "science")
    assert science.pretrain.student == demo.pretrain.student and science.pretrain.teacher == demo.pretrain.teacher
    sources = {s.name for s in science.ingest.sources}
    assert "nc_landsat" not in sources and science.ingest.out_dir != demo.ingest.out_dir
    drawn = {k for k, w in science.pretrain.source_weights.items() if w > 0}
    assert drawn == sources  # every source of the pile is drawn, none outside it
    assert {e.name for e in science.science.eval_sets} == {"nc_landcover", "flair2"}
    assert science.pretrain.epochs * science.pretrain.samples_per_epoch // science.pretrain.batch_size >= (
        science.science.steps)  # the schedule holds the step budget


def test_pretraining_has_no_mode_that_bypasses_the_data_gates():
    from gfm_core.config import parse_params

    with pytest.raises(ConfigError, match=r"pretrain\.data: unknown key"):  # `files` read images around every gate
        parse_params({"pretrain": {"data": "files"}})


@pytest.mark.parametrize(
    "pooled, match",
    [
        ({"gfm3": ["gfm"]}, "a pooled row needs two or more runs"),
        ({"gfm3": ["gfm", "nope"]}, "'nope' is not in finetune.models"),
        ({"a": ["gfm", "random"], "b": ["random", "imagenet"]}, "'random' is already pooled into 'a'"),
        ({"imagenet": ["gfm", "random"]}, "'imagenet' is also a finetune model"),
    ],
)
def test_pooled_pretraining_rows_name_real_models_once(repo_root, pooled, match):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["evaluate"]["pretraining_seeds"] = pooled
    with pytest.raises(ConfigError, match=match):
        parse_params(raw, source="params.yaml")
