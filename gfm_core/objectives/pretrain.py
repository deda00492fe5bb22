"""GFM teacher-student continual pretraining as one ``nn.Module`` that returns named loss parts.

``ContinualPretrain.forward(batch)`` takes ``{"image": [B, C, H, W] normalised, "mask": [B, h, w]}``.
The student encodes the masked image; the decoder reconstructs pixels (masked L1 on the normalised image); the
pooled student stage-3 feature (incl. patch merging) goes through the projector and is pulled towards the
frozen teacher's pooled stage feature of the *unmasked* image, resized and re-normalised for the teacher
(negative cosine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gfm_core.config import PretrainCfg
from gfm_core.errors import ConfigError
from gfm_core.io import save_weights, sha256_file, sidecar_path, write_json
from gfm_core.losses import gfm_loss
from gfm_core.models.backbones import FrozenTeacher, create_student, create_teacher, set_fused_attention
from gfm_core.models.simmim import MaskedSwin, PixelShuffleDecoder, make_projector
from gfm_core.models.weights import pretrained_cfg
from gfm_core.training.optim import is_no_decay

STUDENT_FEATURE_STAGE = 3
"""The student's distilled stage (paper: stage 3 incl. its patch merging, 6x6x1024 for Swin-B at 192 px)."""

TEACHER_PREFIX = "teacher."
"""State-dict prefix of the frozen teacher: left out of checkpoints (it is reloaded from its own file)."""


def _drop_teacher(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + TEACHER_PREFIX)]:
        del state_dict[key]


def _teacher_keys_not_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if TEACHER_PREFIX not in k]


class ContinualPretrain(nn.Module):
    """The GFM objective: student (masked) + decoder + projector, against a frozen teacher.

    Args:
        student: the mask-token Swin encoder.
        decoder: ``[B, C_4, h, w] -> [B, C, H, W]`` reconstruction head.
        projector: ``[B, C_s] -> [B, D_teacher]``.
        teacher: the frozen teacher, or ``None`` for a MIM-only run (then ``alpha`` must be 0).
        w_mim: weight of the masked L1 loss (0 = distillation only; the parts are still computed and logged).
        alpha: weight of the distillation loss (0 = MIM only; the teacher is not run at all).
        mean, std: the normalisation of ``batch["image"]`` (re-normalised to the teacher's own for it).
    """

    def __init__(
        self,
        student: MaskedSwin,
        decoder: nn.Module,
        projector: nn.Module,
        teacher: FrozenTeacher | None,
        *,
        w_mim: float = 1.0,
        alpha: float = 1.0,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if w_mim < 0 or alpha < 0:
            raise ConfigError(f"w_mim {w_mim} and alpha {alpha} must be >= 0")
        if w_mim == 0 and alpha == 0:
            raise ConfigError("w_mim and alpha are both 0: the objective would train nothing")
        if alpha > 0 and teacher is None:
            raise ConfigError(f"alpha {alpha} > 0 needs a teacher (set teacher.checkpoint or alpha: 0)")
        if len(mean) != student.in_chans or len(std) != student.in_chans:
            raise ConfigError(
                f"student normalisation has {len(mean)} mean / {len(std)} std values for {student.in_chans} "
                f"input channels"
            )
        if teacher is not None and len(teacher.mean) != student.in_chans:
            raise ConfigError(
                f"teacher expects {len(teacher.mean)} channels (its pretrained mean/std) but the student "
                f"takes {student.in_chans}; both see the same image"
            )
        self.student = student
        self.decoder = decoder
        self.projector = projector
        self.teacher = teacher
        self.w_mim = float(w_mim)
        self.alpha = float(alpha)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        # Checkpoints hold only what trains: a Swin-B teacher would add ~350 MB to every one of them.
        self.register_state_dict_post_hook(_drop_teacher)
        self.register_load_state_dict_post_hook(_teacher_keys_not_missing)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One objective evaluation.

        Args:
            batch: ``{"image": [B, C, H, W] normalised, "mask": [B, h, w] token resolution, 1 = masked}``,
                optionally ``"teacher_target": [B, D]`` (the frozen teacher's features of the unmasked image,
                precomputed; the teacher is then not run).

        Returns:
            Scalar tensors ``loss`` (= w_mim * mim + alpha * distill), ``mim``, ``distill`` (negative cosine,
            exactly 0 when the teacher is skipped), and, detached, ``cosine`` (mean teacher-student cosine;
            0 when the teacher is skipped) and ``embed_std`` (std over the batch of the L2-normalised
            projected student features, averaged over dims: about ``1/sqrt(D)`` when healthy, near 0 on
            collapse; 0 for B = 1).
        """
        x, mask = batch["image"], batch["mask"]
        feature, final_map = self.student(x, mask)
        pred = self.decoder(final_map)
        p = self.student.patch_size
        mask_pixels = mask.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1).unsqueeze(1)
        projected = self.projector(feature)
        target = None
        if self.alpha > 0:
            target = batch.get("teacher_target")  # precomputed (gfm_core.data.pretrain.teacher_pool), else run live
            if target is None and self.teacher is not None:
                target = self.teacher(self.teacher.preprocess(x, self.mean, self.std))
        parts = gfm_loss(pred, x, mask_pixels, projected, target, w_mim=self.w_mim, alpha=self.alpha)
        with torch.no_grad():
            cosine = -parts["distill"].detach() if target is not None else torch.zeros((), device=x.device)
            unit = F.normalize(projected.detach().float(), dim=-1)
            embed_std = unit.std(dim=0, correction=0).mean()
        return {**parts, "cosine": cosine, "embed_std": embed_std}

    def teacher_targets(self, x: Tensor) -> Tensor:
        """The frozen teacher's ``[B, D]`` targets of normalised student views ``x`` (no grad).

        Raises:
            ConfigError: the objective has no teacher (MIM-only).
        """
        if self.teacher is None:
            raise ConfigError("this objective has no teacher (alpha 0): there are no teacher targets")
        return self.teacher(self.teacher.preprocess(x, self.mean, self.std))

    def reconstruct(self, x: Tensor, mask: Tensor) -> Tensor:
        """The decoder's ``[B, C, H, W]`` prediction of ``x`` (normalised) from its visible patches."""
        _, final_map = self.student(x, mask)
        return self.decoder(final_map)

    def no_weight_decay_names(self) -> set[str]:
        """Names (as in ``named_parameters()``) of trainable params that AdamW must not decay.

        Build the groups as
        ``decay = [p for n, p in named_parameters() if p.requires_grad and n not in nwd]`` and
        ``no_decay = [p ... if p.requires_grad and n in nwd]``; the teacher's params have
        ``requires_grad=False`` and belong in neither.
        """
        return {n for n, p in self.named_parameters() if p.requires_grad and is_no_decay(n, p)}


def build_continual_pretrain(
    cfg: PretrainCfg,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ContinualPretrain:
    """Build the paper's objective from the ``pretrain`` params section.

    Args:
        cfg: the pretrain section (student, teacher, w_mim, alpha).
        mean, std: the data pipeline's normalisation; default the student arch's ``pretrained_cfg`` values
            (ImageNet for Swin), which must have one value per input channel.

    With ``alpha == 0`` no teacher is built (MIM-only baseline; ``teacher.checkpoint`` may be unset) and the
    projector maps to the student's own stage dim so ``embed_std`` is still reported.

    With ``cfg.device`` cuda (or auto with a GPU visible), timm's Swin attention runs through
    ``F.scaled_dot_product_attention`` (:func:`set_fused_attention`; the same function, the memory-efficient
    kernel); on the CPU timm's own path is kept, as it is the faster one there under bf16 autocast. (Under
    bf16/fp16 autocast the backends keep the frozen teacher's matmul weights in that dtype:
    :meth:`FrozenTeacher.lower_precision_`.) ``cfg.grad_checkpointing`` recomputes the student's blocks in the
    backward pass instead of keeping their activations.

    Raises:
        ConfigError, CheckpointError: from :func:`create_student` / :func:`create_teacher`.
    """
    encoder = create_student(cfg.student)
    if cfg.grad_checkpointing:
        cast(Any, encoder).set_grad_checkpointing(True)
    student = MaskedSwin(
        encoder,
        feature_stage=STUDENT_FEATURE_STAGE,
        arch=cfg.student.arch,
        timm_kwargs=cfg.student.timm_kwargs(),
    )
    pcfg = pretrained_cfg(encoder)
    mean = tuple(mean if mean is not None else pcfg["mean"])
    std = tuple(std if std is not None else pcfg["std"])
    if len(mean) != cfg.student.in_chans or len(std) != cfg.student.in_chans:
        raise ConfigError(
            f"student.in_chans {cfg.student.in_chans}: pass a mean/std with one value per channel "
            f"(got {len(mean)}/{len(std)} values)"
        )
    decoder = PixelShuffleDecoder(student.num_features, student.out_stride, cfg.student.in_chans)
    teacher = create_teacher(cfg.teacher) if cfg.alpha > 0 else None
    if teacher is not None:
        teacher.drop_unused_()  # the stages past the distilled one are never run: less memory
    teacher_dim = teacher.feature_dim if teacher is not None else student.stage_dim
    projector = make_projector(student.stage_dim, teacher_dim)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        set_fused_attention(student.encoder)
        if teacher is not None:
            set_fused_attention(teacher.model)
    return ContinualPretrain(
        student, decoder, projector, teacher, w_mim=cfg.w_mim, alpha=cfg.alpha, mean=mean, std=std
    )


def export_backbone(
    objective: ContinualPretrain,
    path: str | Path,
    meta: Mapping[str, Any] | None = None,
    *,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Save only the student encoder (timm key names, no mask token) as safetensors plus a JSON sidecar.

    The file loads with ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path),
    **timm_kwargs)`` or :func:`gfm_core.models.weights.load_backbone`. The sidecar (``<name>.json``) holds
    ``arch``, ``timm_kwargs``, ``window_size``, ``pretrained_cfg`` (input_size, mean, std, num_classes 0),
    ``weights_sha256`` and ``meta`` (what the caller passes: teacher id/sha256, data manifest hash, ...).
    ``state_dict`` (the whole objective's, e.g. gathered from ZeRO-3 shards) replaces the module's own weights.

    Raises:
        ConfigError: ``path`` does not end in ``.safetensors`` (timm picks the reader by suffix).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"{path}: backbone exports must end in .safetensors (timm picks the loader by suffix)"
        )
    student = objective.student
    prefix = "student.encoder."
    weights = (
        {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if state_dict is not None
        else student.encoder.state_dict()
    )
    save_weights(path, weights)
    h, w = student.img_size
    kwargs = dict(student.timm_kwargs)
    write_json(
        sidecar_path(path),
        {
            "format": "gfm-backbone/1",
            "arch": student.arch,
            "timm_kwargs": kwargs,
            "window_size": kwargs.get("window_size"),
            "pretrained_cfg": {
                "architecture": student.arch,
                "input_size": [student.in_chans, h, w],
                "mean": list(objective.mean),
                "std": list(objective.std),
                "num_classes": 0,
            },
            "weights_sha256": sha256_file(path),
            "meta": dict(meta or {}),
        },
    )
    return path
