"""The pretraining section: the student, the frozen teacher, the loss, the schedule and the ablations."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from gfm_core.config.base import Section, _deep_merge, _format_error
from gfm_core.errors import ConfigError


class StudentCfg(Section):
    """The student backbone: a timm Swin created by name, random init (paper: Swin-B at 192 px, window 6)."""

    arch: str = "swin_base_patch4_window7_224"
    img_size: int = Field(192, ge=32)
    window_size: int = Field(6, ge=1)
    in_chans: int = Field(3, ge=1)
    patch_size: int = Field(4, ge=1)
    embed_dim: int | None = Field(None, ge=8, description="override the arch's width (tiny demo models)")
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    drop_path_rate: float = Field(0.0, ge=0, lt=1)

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (unset overrides are left to the arch)."""
        kw: dict[str, Any] = dict(
            img_size=self.img_size, window_size=self.window_size, in_chans=self.in_chans,
            patch_size=self.patch_size, drop_path_rate=self.drop_path_rate, num_classes=0,
        )
        for key in ("embed_dim", "depths", "num_heads"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        return kw


class TeacherCfg(Section):
    """The frozen ImageNet teacher: any timm model loaded from a local checkpoint file."""

    arch: str = "swin_base_patch4_window7_224"
    checkpoint: Path | None = Field(
        None, description="local weight file (.safetensors or .pth); nothing is ever downloaded"
    )
    img_size: int | None = Field(None, ge=32, description="input size; None = the arch's pretrained size")
    feature_stage: int = Field(3, ge=1, description="1-based stage whose (pooled) output is distilled")
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model kwargs (a non-default width or depth)"
    )


class PretrainCfg(Section):
    """Teacher-student continual pretraining (paper section 2; defaults are the paper's values)."""

    student: StudentCfg = StudentCfg()
    teacher: TeacherCfg = TeacherCfg()
    mask_patch_size: int = Field(32, ge=1)
    mask_ratio: float = Field(0.6, gt=0, lt=1)
    w_mim: float = Field(1.0, ge=0, description="weight of the masked L1 reconstruction loss")
    alpha: float = Field(1.0, ge=0, description="weight of the negative-cosine distillation loss")
    crop_scale: tuple[float, float] = (0.67, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    batch_size: int = Field(128, ge=1, description="per-device micro-batch")
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(100, ge=1)
    warmup_epochs: int = Field(10, ge=0)
    max_steps: int | None = Field(None, ge=1, description="stop early after this many optimizer steps")
    lr_scaling: Literal["linear", "none"] = Field(
        "linear", description="linear: lrs x global batch / 512 (the paper's rule); none: as written (tiny batches)"
    )
    base_lr: float = Field(2e-4, gt=0, description="peak lr (before lr_scaling)")
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = Field(5.0, gt=0)
    samples_per_epoch: int | None = Field(
        None, ge=1, description="None = each pile image once per epoch (paper); N = N weighted draws per epoch"
    )
    source_weights: dict[str, float] | None = Field(
        None, description="share of draws per source (needs samples_per_epoch); None = by pixel count"
    )
    holdout_fraction: float = Field(
        0.01, ge=0, lt=1, description="share of each source's images never trained on (learning is measured there)"
    )
    holdout_crops: int = Field(256, ge=1, description="fixed held-out views measured at every logged step")
    teacher_pool: int | None = Field(
        None, ge=1, description="None = run the teacher live; N = targets of N fixed views computed once (cached)"
    )
    teacher_pool_seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_checkpointing: bool = Field(
        False,
        description="recompute the student's Swin blocks in backward (timm set_grad_checkpointing): less "
        "activation memory for about a third more student compute; the same numbers",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when visible, else cpu (logged)")
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_workers: int = Field(8, ge=0)
    checkpoint_every: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    out_dir: Path = Path("outputs/pretrain")
    ablations: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"mim_only": {"alpha": 0.0}, "distill_only": {"w_mim": 0.0}},
        description="name -> overrides of this section for a pretraining ablation of its own (the paper's: MIM-only "
        "and distill-only); it writes to <out_dir>_<name> (ablation_dir)",
    )

    @model_validator(mode="after")
    def _check_geometry(self) -> PretrainCfg:
        s = self.student
        if s.img_size % self.mask_patch_size:
            raise ValueError(
                f"student.img_size {s.img_size} must be divisible by mask_patch_size {self.mask_patch_size}"
            )
        if self.mask_patch_size % s.patch_size:
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be divisible by student.patch_size {s.patch_size}"
            )
        depths = s.depths or (2, 2, 18, 2)
        final_stride = s.patch_size * 2 ** (len(depths) - 1)
        if s.img_size % final_stride:
            raise ValueError(
                f"student.img_size {s.img_size} must be divisible by the final stride {final_stride} "
                f"(patch_size x 2^(stages-1))"
            )
        for i in range(len(depths)):
            grid = s.img_size // (s.patch_size * 2**i)
            if grid > s.window_size and grid % s.window_size:
                raise ValueError(
                    f"student.window_size {s.window_size} must divide the stage-{i + 1} grid {grid}x{grid} "
                    f"(img_size {s.img_size} / patch {s.patch_size} / 2^{i})"
                )
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be < epochs {self.epochs}")
        if self.source_weights is not None:
            if self.samples_per_epoch is None:
                raise ValueError("source_weights needs samples_per_epoch (weighted draws)")
            if min(self.source_weights.values(), default=0) < 0 or not sum(self.source_weights.values()) > 0:
                raise ValueError(f"source_weights must be >= 0 with a positive sum, got {self.source_weights}")
        return self

    def ablation_dir(self, name: str | None) -> Path:
        """Where the pretraining ``name`` writes: ``out_dir`` itself, or ``<out_dir>_<name>`` for an ablation."""
        return self.out_dir if name is None else self.out_dir.with_name(f"{self.out_dir.name}_{name}")

    def ablation(self, name: str) -> PretrainCfg:
        """This section with the ablation ``name``'s overrides, writing to :meth:`ablation_dir`.

        Raises:
            ConfigError: unknown ablation (the message lists them), or overrides that are not valid settings.
        """
        if name not in self.ablations:
            valid = ", ".join(self.ablations) or "(none configured)"
            raise ConfigError(f"pretrain.ablations: unknown ablation {name!r}; valid: {valid}")
        raw = _deep_merge(self.model_dump(mode="json"), dict(self.ablations[name]))
        raw.update(out_dir=str(self.ablation_dir(name)), ablations={})
        try:
            return PretrainCfg.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_format_error(f"pretrain.ablations.{name}", e)) from None

