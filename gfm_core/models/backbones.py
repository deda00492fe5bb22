"""Student and teacher backbones from timm, and the one definition of "stage features" both sides use.

Stage numbering is 1-based. For timm's ``SwinTransformer`` the paper's "stage L output" *includes* the patch
merging that the original Swin code runs at the end of stage L; timm runs it at the start of stage L+1
(``layers[L].downsample``), so here stage L = ``layers[L].downsample(layers[L-1](...))``: 6x6x1024 for the
Swin-B student at 192 px and 7x7x1024 for the Swin-B teacher at 224 px (stage 3). The last stage has no merge
after it. Every other timm model uses ``forward_intermediates(indices=[L - 1])``.

Weights are only read from local files (:mod:`gfm_core.models.weights`); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage
from torch import Tensor, nn

from gfm_core.config import StudentCfg, TeacherCfg
from gfm_core.errors import ConfigError
from gfm_core.models.weights import check_arch, load_timm_weights, pretrained_cfg


def is_swin(model: nn.Module) -> TypeGuard[SwinTransformer]:
    """True for timm's (v1) ``SwinTransformer``, whose stage features include the following patch merging."""
    return isinstance(model, SwinTransformer)


def swin_stages(model: SwinTransformer) -> Sequence[SwinTransformerStage]:
    """``model.layers`` (an ``nn.Sequential`` of stages), typed as the sequence of stages it holds."""
    return cast(Sequence[SwinTransformerStage], model.layers)


def create_student(cfg: StudentCfg) -> nn.Module:
    """A randomly initialised timm model (paper: Swin-B, 192 px, window 6, no head).

    Raises:
        ConfigError: unknown arch or kwargs the arch does not accept.
    """
    check_arch(cfg.arch, "student.arch")
    try:
        return timm.create_model(cfg.arch, pretrained=False, **cfg.timm_kwargs())
    except TypeError as e:
        raise ConfigError(f"student: timm model {cfg.arch!r} rejects its arguments ({e})") from e


class FrozenTeacher(nn.Module):
    """A frozen timm model that maps a teacher-ready image to pooled stage features.

    It stays in eval mode whatever ``train()`` is called with, has ``requires_grad=False`` everywhere and runs
    under ``torch.no_grad()``.

    Attributes:
        model: the timm model.
        stage: 1-based stage whose pooled output is returned.
        input_size: ``(H, W)`` the teacher expects.
        mean, std: the normalisation of the teacher's pretrained weights (``pretrained_cfg``).
        source: the weight file it was loaded from.
    """

    def __init__(
        self,
        model: nn.Module,
        stage: int,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        source: Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.source = source
        self.compute_dtype: torch.dtype | None = None
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore ``mode``: the teacher is always in eval mode (BatchNorm statistics, dropout)."""
        return super().train(False)

    def preprocess(self, x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
        """Student batch ``[B, C, H, W]`` normalised with ``mean``/``std`` -> teacher-ready input."""
        return teacher_inputs(
            x, self.input_size, src_mean=mean, src_std=std, dst_mean=self.mean, dst_std=self.std
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, *input_size]`` teacher-normalised -> ``[B, D]`` pooled stage features (no grad).

        After :meth:`lower_precision_` it runs under ``torch.autocast(compute_dtype)`` whatever the caller's
        autocast state.
        """
        with torch.no_grad(), self._autocast(x.device):
            return stage_features(self.model, x, self.stage)

    def lower_precision_(self, dtype: torch.dtype) -> FrozenTeacher:
        """Keep the plain matmul layers' (Linear, Conv) weights in ``dtype`` and run under autocast ``dtype``.

        Under ``torch.autocast(dtype)`` exactly these layers cast their float32 weights to ``dtype`` on every
        call: autocast caches casts only of parameters that require grad, and a frozen teacher's don't.
        Casting them once gives bit-identical features, without the per-step casts and with half of their
        memory. Everything autocast runs in float32 keeps float32 weights (norms, position-bias tables,
        subclassed convs such as weight-standardised ones). In place; returns ``self``.
        """
        if not dtype.is_floating_point:
            raise ConfigError(f"teacher compute dtype must be a floating dtype, got {dtype}")
        for module in self.model.modules():
            if type(module) in _AUTOCAST_MATMUL_LAYERS:
                module.to(dtype)
        self.compute_dtype = dtype
        return self

    def drop_unused_(self) -> int:
        """Free the Swin modules past the distilled stage, which :meth:`forward` never runs. In place.

        Stage ``s`` (1-based) runs ``layers[:s]`` and ``layers[s].downsample``, so ``layers[s].blocks``, the later
        stages and the final norm go (Swin-B at stage 3: 25 M of its 87 M parameters). The features are
        unchanged. Other models are kept whole. Returns the number of parameters dropped.
        """
        model = self.model
        if not is_swin(model):
            return 0
        before = sum(p.numel() for p in self.parameters())
        layers = list(swin_stages(model))
        if self.stage < len(layers):
            layers[self.stage].blocks = nn.Sequential()
        model.layers = nn.Sequential(*layers[: self.stage + 1])
        model.norm = nn.Identity()
        return before - sum(p.numel() for p in self.parameters())

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.compute_dtype is None or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    @property
    def feature_dim(self) -> int:
        """Channels of the distilled feature."""
        with self._autocast(next(self.model.parameters()).device):
            return feature_dim(self.model, self.stage, self.input_size)


_AUTOCAST_MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layer types whose forward is one ``F.linear``/``F.conv*`` call (exact types: subclasses may use weights
elsewhere, e.g. weight standardisation)."""


def set_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every timm attention module of ``model`` to (or off) ``F.scaled_dot_product_attention``.

    timm fixes the choice per module at construction (``fused_attn``, from ``TIMM_FUSED_ATTN``); Swin's
    ``WindowAttention`` only takes the SDPA path with ``TIMM_FUSED_ATTN=2`` as timm still calls it
    experimental. Both paths compute the same function: the relative-position bias and the shifted-window mask
    become SDPA's additive ``attn_mask`` (gradients reach the bias table). On CUDA, SDPA runs the
    memory-efficient kernel; on the CPU a mask that needs a gradient sends it to the float32 math fallback,
    which is slower than timm's own path under bf16 autocast.

    Returns:
        The number of modules switched.
    """
    switched = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            cast(Any, module).fused_attn = bool(enabled)
            switched += 1
    return switched


def create_teacher(cfg: TeacherCfg, **overrides: Any) -> FrozenTeacher:
    """The frozen teacher, loaded from ``cfg.checkpoint`` through timm's own pretrained path.

    timm's ``checkpoint_filter_fn`` for Swin accepts the original Swin release layout (``{"model": ...}``,
    merges at the end of a stage, ``head.*``, ``relative_position_index``/``attn_mask`` buffers) as it is: it
    detects ``layers.0.downsample.*``, shifts every merge to the next stage and drops the buffers; the head is
    dropped because the teacher is built with ``num_classes=0``.

    Args:
        cfg: teacher section of the params.
        **overrides: extra ``timm.create_model`` kwargs (tiny test teachers: ``embed_dim``, ``depths``, ...).

    Raises:
        ConfigError: no checkpoint configured, unknown arch, bad kwargs.
        CheckpointError: the file is missing, unreadable, or does not match the arch (any missing or
            unexpected key: timm itself only logs these when ``num_classes`` differs from the checkpoint's).
    """
    if cfg.checkpoint is None:
        raise ConfigError(
            "teacher.checkpoint: a local weight file is required; nothing is downloaded "
            "(set teacher.checkpoint in params.yaml, e.g. weights/swin_base_patch4_window7_224_22k.pth)"
        )
    kwargs: dict[str, Any] = dict(num_classes=0, **{**cfg.timm_kwargs, **overrides})
    if cfg.img_size is not None:
        kwargs.setdefault("img_size", cfg.img_size)
    model = load_timm_weights(
        cfg.arch, cfg.checkpoint, field="teacher.checkpoint", arch_field="teacher.arch", **kwargs
    )
    pcfg = pretrained_cfg(model)
    if cfg.img_size is not None:
        input_size = (cfg.img_size, cfg.img_size)
    else:
        input_size = tuple(pcfg["input_size"][-2:])
    return FrozenTeacher(
        model, cfg.feature_stage, input_size, pcfg["mean"], pcfg["std"], Path(cfg.checkpoint)
    )


def stage_map(model: nn.Module, x: Tensor, stage: int) -> Tensor:
    """The output map of a 1-based ``stage``: ``[B, C, h, w]`` (NCHW for every model).

    Swin: ``layers[stage].downsample(layers[stage - 1](...))`` (the paper's stage including its patch merging;
    the last stage has none). Other models: ``forward_intermediates(x, indices=[stage - 1])``.

    Raises:
        ConfigError: stage out of range, or a model without ``forward_intermediates``.
    """
    if is_swin(model):
        layers = swin_stages(model)
        _check_stage(stage, len(layers), type(model).__name__)
        t = model.patch_embed(x)  # NHWC
        for i in range(stage):
            t = layers[i](t)
        if stage < len(layers):
            t = layers[stage].downsample(t)
        return t.permute(0, 3, 1, 2)
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"{type(model).__name__} has no forward_intermediates(); pick a timm model that has"
        )
    num_stages = len(getattr(model, "feature_info", []) or []) or None
    if num_stages is not None:
        _check_stage(stage, num_stages, type(model).__name__)
    (out,) = cast(Any, model).forward_intermediates(x, indices=[stage - 1], intermediates_only=True)
    if out.dim() != 4:
        raise ConfigError(
            f"{type(model).__name__} stage {stage}: expected an NCHW map, got {tuple(out.shape)}"
        )
    return out


def _check_stage(stage: int, num_stages: int, name: str) -> None:
    if not 1 <= stage <= num_stages:
        raise ConfigError(
            f"feature_stage {stage} is out of range for {name} with {num_stages} stages (1-based)"
        )


def stage_features(model: nn.Module, x: Tensor, stage: int) -> Tensor:
    """``[B, C]``: :func:`stage_map` averaged over its spatial positions (no norm)."""
    return stage_map(model, x, stage).mean(dim=(2, 3))


def feature_dim(model: nn.Module, stage: int, img_size: int | tuple[int, int]) -> int:
    """Channels of :func:`stage_features`, found by one no-grad forward of a zero image in eval mode."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    param = next(model.parameters())
    in_chans = int(getattr(model, "in_chans", None) or pretrained_cfg(model).get("input_size", (3,))[0])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, in_chans, *size, device=param.device, dtype=param.dtype)
            return int(stage_map(model, x, stage).shape[1])
    finally:
        model.train(was_training)


def teacher_inputs(
    x: Tensor,
    size: tuple[int, int],
    *,
    src_mean: Sequence[float],
    src_std: Sequence[float],
    dst_mean: Sequence[float],
    dst_std: Sequence[float],
) -> Tensor:
    """Resize a normalised batch to the teacher's size and re-normalise it to the teacher's mean/std.

    Resizing is bilinear with ``align_corners=True`` (GFM's ``F.interpolate(x, (224, 224), ...)``); a
    per-channel affine map commutes with it, so the order does not matter. Equal normalisations are left
    untouched.

    Args:
        x: ``[B, C, H, W]`` normalised with ``src_mean``/``src_std``.
        size: ``(H_t, W_t)``.

    Returns:
        ``[B, C, H_t, W_t]`` normalised with ``dst_mean``/``dst_std``.
    """
    if len(src_mean) != x.shape[1] or len(dst_mean) != x.shape[1]:
        raise ConfigError(
            f"teacher input: {x.shape[1]} channels but student mean has {len(src_mean)} and teacher mean "
            f"{len(dst_mean)} values (student and teacher must see the same bands)"
        )
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    if tuple(src_mean) != tuple(dst_mean) or tuple(src_std) != tuple(dst_std):
        kw: dict[str, Any] = dict(device=x.device, dtype=x.dtype)
        s_mean = torch.tensor(src_mean, **kw).view(1, -1, 1, 1)
        s_std = torch.tensor(src_std, **kw).view(1, -1, 1, 1)
        d_mean = torch.tensor(dst_mean, **kw).view(1, -1, 1, 1)
        d_std = torch.tensor(dst_std, **kw).view(1, -1, 1, 1)
        x = (x * s_std + s_mean - d_mean) / d_std
    return x
