"""Typed experiment config: ``params.yaml`` -> pydantic models.

``params.yaml`` holds the paper's values in its stage sections and named presets (``presets.demo``) that override
some of them. The top-level ``preset`` key (or ``--preset`` on the CLI) picks the preset in force.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gfm_core.data.ingest.sources import IngestSettings, SourceSpec
from gfm_core.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoDataCfg(Section):
    """Embedded demo data built from real imagery shipped in registry packages."""

    root: Path = Path("data/demo")
    seed: int = 0
    tile_size: int = Field(32, ge=8, description="task tile size in pixels of the 28.5 m NC Landsat grid")
    block_tiles: int = Field(3, ge=1, description="spatial split block edge, in tiles (blocks never straddle splits)")
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    min_valid_fraction: float = Field(0.99, gt=0, le=1, description="tiles with less valid imagery are dropped")
    multilabel_min_fraction: float = Field(0.05, gt=0, lt=1, description="a class is present above this area share")
    scene_classes: tuple[int, ...] = Field((1, 3, 5), description="land-cover codes kept for scene classification")
    sr_scale: int = Field(4, ge=2)
    pile_chip_size: int = Field(256, ge=32, description="other pile rasters are cut whole into chips of about this")
    pile_min_chip: int = Field(64, ge=8, description="chips with a shorter side are dropped")

    @model_validator(mode="after")
    def _check(self) -> DemoDataCfg:
        if abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        if self.tile_size % self.sr_scale:
            raise ValueError(f"tile_size {self.tile_size} must be divisible by sr_scale {self.sr_scale}")
        return self


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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when visible, else cpu (logged)")
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_workers: int = Field(8, ge=0)
    checkpoint_every: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    out_dir: Path = Path("outputs/pretrain")

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

    def lr_factor(self, global_batch: int) -> float:
        """What ``base_lr``, ``warmup_lr`` and ``min_lr`` are multiplied by (``lr_scaling``)."""
        return global_batch / 512 if self.lr_scaling == "linear" else 1.0


class IngestCfg(Section):
    """Where the pile is and how to read it.

    ``sources`` lists the pile's sources explicitly (folders relative to ``root``); empty = every subfolder of
    ``root`` is a source (GFM's ``GeoPileV0/<source>/<class>/<image>`` layout; preset names are recognised).
    """

    root: Path = Path("data/GeoPileV0")
    out_dir: Path = Path("outputs/geopile")
    sources: tuple[SourceSpec, ...] = ()
    settings: IngestSettings = IngestSettings()
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    stretch: tuple[float, float] | None = Field(
        None, description="per-source, per-band contrast stretch: these percentiles -> 0 and 1 (e.g. [2, 98]); "
        "None = none (GeoPile's 8-bit images)",
    )
    shard_size: int = Field(256, ge=32, description="training shards keep images with their short side at most this")
    images_per_shard: int = Field(512, ge=1)


class ValidateCfg(Section):
    """Great-expectations rules the ingested pile must pass before training (``gfm validate``)."""

    min_size: int | None = Field(None, ge=1, description="shortest image side; None = pretrain.student.img_size")
    allowed_bands: tuple[int, ...] = (3,)
    mean_range: tuple[float, float] = Field((0.01, 0.99), description="plausible per-band means of [0, 1] data")
    max_nodata_fraction: float = Field(0.5, ge=0, le=1)
    data_docs: bool = True
    contamination_exclude: tuple[str, ...] = Field(
        (), description="finetune.tasks names left out of the contamination check (their folders may be absent)"
    )


TaskHeadName = Literal["classification", "multilabel", "segmentation", "change", "superres"]
TaskLayout = Literal["ucmerced", "resisc45", "eurosat", "bigearthnet", "oscd", "levircd", "folders"]

#: The folder layouts each head can read (torchgeo's layouts plus the generic ``folders`` one).
LAYOUTS_BY_HEAD: dict[str, tuple[str, ...]] = {
    "classification": ("ucmerced", "resisc45", "eurosat"),
    "multilabel": ("bigearthnet",),
    "segmentation": ("folders",),
    "change": ("levircd", "oscd", "folders"),
    "superres": ("folders",),
}


class TaskCfg(Section):
    """One downstream task: its local data folder and layout, head, input geometry and label handling.

    Images are read band by band (``bands`` / ``band_files``), scaled to [0, 1] with ``value_range``, resized
    to ``img_size`` and normalised with the backbone's own mean/std. Labels (masks, change maps, HR targets)
    stay at their native size; predictions are resized to them.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    head: TaskHeadName
    layout: TaskLayout
    root: Path
    img_size: int = Field(ge=16, description="backbone input size in pixels (images are resized to it)")
    window_size: int | None = Field(None, ge=1, description="Swin window at img_size; None = the backbone's")
    bands: tuple[int, ...] | None = Field(
        None, description="1-based band indexes of multi-band files, in order (Landsat RGB: [3, 2, 1])"
    )
    band_files: tuple[str, ...] = Field(
        ("B04", "B03", "B02"), description="per-band file names of the bigearthnet/oscd layouts (RGB)"
    )
    value_range: tuple[float, float] | None = Field(
        None, description="(lo, hi) mapped to [0, 1]; None = the file dtype's default (gfm_core.data.raster)"
    )
    stretch_source: str | None = Field(
        None, description="apply this pile source's contrast stretch (ingest.stretch, norm_stats.json): the task "
        "then sees its pixels as pretraining saw that source's",
    )
    stretch: tuple[tuple[float, ...], tuple[float, ...]] | None = Field(
        None, description="per-band (lo, hi) of the [0, 1]-scaled values mapped to 0 and 1 (set from "
        "stretch_source when the task is looked up)",
    )
    classes: tuple[str, ...] | None = Field(
        None, description="label names (multilabel: None = info.json, else BigEarthNet's 19)"
    )
    num_classes: int | None = Field(None, ge=2, description="segmentation classes (or give mask_values)")
    mask_values: tuple[int, ...] | None = Field(
        None, description="segmentation: raw mask value of class 0..K-1 (others are ignored); None = ids"
    )
    ignore_index: int = Field(255, ge=0, description="segmentation mask value that is not scored")
    dirs: tuple[str, ...] | None = Field(
        None, description="folders layout: <split>/<dir>/ names; None = images,masks | A,B,label | lr,hr"
    )
    tile_size: int | None = Field(None, ge=16, description="cut large images into tiles of this size")
    scale: int = Field(4, ge=1, description="superres: HR / LR size ratio")
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of the train split used (0.01, 0.1, 1)")
    headline: str | None = Field(None, description="metric used for ARP and the bootstrap; None = the head's")
    epochs: int | None = Field(None, ge=1, description="override finetune.epochs")
    max_steps: int | None = Field(None, ge=1, description="override finetune.max_steps")
    batch_size: int | None = Field(None, ge=1, description="override finetune.batch_size")

    @model_validator(mode="after")
    def _check(self) -> TaskCfg:
        valid = LAYOUTS_BY_HEAD[self.head]
        if self.layout not in valid:
            raise ValueError(
                f"task {self.name!r}: head {self.head!r} cannot read layout {self.layout!r}; "
                f"valid: {', '.join(valid)}"
            )
        if self.head == "segmentation" and self.num_classes is None and self.mask_values is None:
            raise ValueError(f"task {self.name!r}: segmentation needs num_classes or mask_values")
        n_values = None if self.mask_values is None else len(self.mask_values)
        if self.num_classes is not None and n_values is not None and self.num_classes != n_values:
            raise ValueError(
                f"task {self.name!r}: num_classes {self.num_classes} != {n_values} mask_values"
            )
        if self.value_range is not None and not self.value_range[1] > self.value_range[0]:
            raise ValueError(f"task {self.name!r}: value_range must be (lo, hi) with hi > lo")
        return self


class BackboneSpec(Section):
    """Where a fine-tuned model's backbone comes from; every baseline gets the same heads and budget.

    ``export``: a backbone written by pretraining (``path`` = ``backbone.safetensors`` + JSON sidecar).
    ``teacher``: a timm model loaded from a local checkpoint (``arch`` + ``path``; the ImageNet baseline).
    ``random``: ``arch`` + ``timm_kwargs``, randomly initialised.
    ``pretrain`` holds ``pretrain``-section overrides that produce an export baseline (MIM-only: alpha 0).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["export", "teacher", "random"]
    path: Path | None = None
    arch: str | None = None
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrain: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> BackboneSpec:
        if self.kind in ("export", "teacher") and self.path is None:
            raise ValueError(f"model {self.name!r}: kind {self.kind!r} needs a path (a local weight file)")
        if self.kind in ("teacher", "random") and not self.arch:
            raise ValueError(f"model {self.name!r}: kind {self.kind!r} needs an arch (a timm model name)")
        return self


class FinetuneCfg(Section):
    """Downstream fine-tuning (paper section 3; GFM's main_finetune.py recipe).

    The same schedule and budget for every model; ``base_lr``/``warmup_lr``/``min_lr`` are scaled by
    global batch / 512. Layer-wise lr decay multiplies a backbone layer's lr by ``layer_decay^(depth - id)``.
    """

    tasks: tuple[TaskCfg, ...] = ()
    models: tuple[BackboneSpec, ...] = ()
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    subset_seed: int | None = Field(42, description="seed of the label-fraction subset; None = the run seed")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(100, ge=1)
    warmup_fraction: float = Field(0.2, ge=0, lt=1, description="paper: 20 of 100 epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    base_lr: float = Field(1e-4, gt=0)
    warmup_lr: float = Field(1e-7, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(0.9, gt=0, le=1)
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = Field(5.0, gt=0)
    decoder_dim: int = Field(256, ge=8, description="channels of the FPN decoder (dense heads)")
    augment: bool = Field(True, description="random horizontal flips of training samples")
    cache_samples: bool = Field(False, description="keep decoded training images in memory (small sets)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(4, ge=0)
    log_every: int = Field(10, ge=1)
    out_dir: Path = Path("outputs/finetune")

    @model_validator(mode="after")
    def _check_names(self) -> FinetuneCfg:
        for label, items in (("tasks", self.tasks), ("models", self.models)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"finetune.{label}: duplicate names {dupes}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"finetune.seeds: duplicates in {list(self.seeds)}")
        return self


class EvaluateCfg(Section):
    """The report over fine-tuned results: table, ARP, paired bootstrap CIs, radar chart."""

    models: tuple[str, ...] = Field((), description="rows, in order; empty = every finetune model")
    tasks: tuple[str, ...] = Field((), description="columns, in order; empty = every finetune task")
    baseline: str = Field("imagenet", description="ARP reference model (paper Table 1: ImageNet-22k)")
    reference: str = Field("gfm", description="bootstrap differences are model - reference")
    n_bootstrap: int = Field(1000, ge=10)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    require_complete: bool = Field(True, description="fail when a (model, task, seed) result is missing")
    trivial: bool = Field(True, description="add the trivial predictor of each task as the row `trivial`")
    arp_exclude: dict[str, str] = Field(
        default_factory=dict, description="task -> why it stays out of ARP (reported, not averaged)"
    )
    pretraining_seeds: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="row -> finetune models pooled into it, one per pretraining run; the bootstrap resamples them",
    )
    out_dir: Path = Path("outputs/evaluate")


class TrackingCfg(Section):
    """MLflow: the default store is sqlite + local artifacts under ``outputs/``; a server is one URI away."""

    enabled: bool = True
    uri: str = Field("sqlite:///outputs/mlflow/mlflow.db", description="tracking URI (http://host:5000 for a server)")
    artifacts: Path = Path("outputs/mlflow/artifacts")
    experiment: str = "gfm-pipeline"


class PromoteCfg(Section):
    """Registry promotion: the alias moves only when the candidate passes the evaluation gate."""

    model_name: str = "gfm-foundation"
    alias: str = "champion"
    candidate: str = Field("gfm", description="the finetune.models entry that is the foundation model")
    must_beat: tuple[str, ...] | None = Field(
        None, description="models whose ARP the candidate must beat; None = every other evaluated model"
    )
    min_gain: float = Field(0.0, ge=0, description="ARP points the candidate must gain over the champion")
    require_complete: bool = Field(True, description="refuse when the evaluation misses results")


class RetrainCfg(Section):
    """When the pipeline retrains itself (Dagster schedule and teacher sensor)."""

    cron: str = Field("0 3 * * 0", description="retraining schedule (cron, UTC); default Sundays 03:00")
    teacher_dir: Path = Field(Path("weights/teachers"), description="a new checkpoint here triggers a retrain")
    teacher_patterns: tuple[str, ...] = ("*.safetensors", "*.pth", "*.pt")
    timm_patterns: tuple[str, ...] | None = Field(
        None, description="timm.list_pretrained patterns to watch for new ImageNet weights after a timm "
        "upgrade; None = the teacher's own arch (`<pretrain.teacher.arch>*`), [] = off",
    )


class EvalSetCfg(Section):
    """A densely labelled evaluation set of the science experiment: image/mask pairs, read whole.

    Images are ``<root>/<split>/<images>/*`` (every split of ``splits`` pooled; ``splits: []`` = ``<root>``
    itself) and masks the same stem under ``<masks>``. Pixels are scaled with ``value_range``, area-averaged by
    ``downsample`` (labels by majority) and contrast-stretched with the set's own ``stretch`` percentiles (the
    rule the pile's sources get). ``mask_values[k]`` is the raw code of class ``k``; other codes are ignored.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    root: Path
    splits: tuple[str, ...] = ()
    images: str = "images"
    masks: str = "masks"
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    mask_values: tuple[int, ...] = Field(min_length=2)
    class_names: tuple[str, ...] | None = None
    downsample: int = Field(1, ge=1, description="area-average factor (FLAIR-2's 0.2 m -> 0.4 m: 2)")
    stretch: tuple[float, float] | None = (2.0, 98.0)
    block_size: int = Field(
        64, ge=4, description="spatial CV block edge in pixels (after downsampling); a multiple of the student's "
        "input size, so no feature of one block sees pixels of another",
    )
    margin: int = Field(8, ge=0, description="scored pixels keep this far from their block's edge")
    pixels_per_block: int = Field(64, ge=1, description="labelled pixels scored per block (fixed sample)")
    min_labelled: float = Field(0.25, gt=0, le=1, description="blocks with fewer labelled pixels are dropped")
    gsd_m: float | None = Field(None, gt=0, description="ground sample distance after downsampling (report)")


class ScienceCfg(Section):
    """The small-scale test of the paper's claims (``make science``; gfm_core.science).

    Every variant is a pretraining of the active ``pretrain`` section with its overrides, for ``steps``
    optimizer steps, once per seed; ``random`` (the student's initial weights) is scored too.
    """

    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"gfm": {}, "mim_only": {"alpha": 0.0}, "distill_only": {"w_mim": 0.0}},
        description="name -> pretrain overrides; gfm, mim_only and distill_only are the hypotheses' models",
    )
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=2)
    steps: int = Field(1500, ge=1, description="optimizer steps of every pretraining (fixed; never wall time)")
    curve_fractions: tuple[float, ...] = Field((0.25, 0.5, 1.0), description="H4: probe gfm/mim_only here")
    eval_sets: tuple[EvalSetCfg, ...] = ()
    student_levels: tuple[int, ...] = Field((0, 1, 2, 3), description="0-based stages probed (upsampled)")
    teacher_levels: tuple[int, ...] = Field((2, 3, 4), description="the teacher's feature levels probed")
    folds: int = Field(5, ge=2)
    probe_weight_decay: float = Field(1e-3, ge=0)
    probe_iters: int = Field(100, ge=1)
    n_bootstrap: int = Field(2000, ge=100)
    ci: float = Field(0.95, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    relevance_margin: float = Field(2.0, ge=0, description="points the teacher must beat raw and MIM-only by")
    h4_margin: float = Field(
        1.0, ge=0, description="H4 'reaches': GFM at half the FLOPs is within this many points of MIM-only's final"
    )
    seed: int = 0
    out_dir: Path = Path("outputs/science")

    @model_validator(mode="after")
    def _check(self) -> ScienceCfg:
        missing = {"gfm", "mim_only", "distill_only"} - set(self.variants)
        if missing:
            raise ValueError(f"science.variants must define {sorted(missing)} (the hypotheses compare them)")
        if any(not 0 < f <= 1 for f in self.curve_fractions) or 1.0 not in self.curve_fractions:
            raise ValueError(f"science.curve_fractions must lie in (0, 1] and include 1, got {self.curve_fractions}")
        for name, over in self.variants.items():  # anything else would break the variants' common random numbers
            extra = sorted(set(over) - {"w_mim", "alpha"})
            if extra:
                raise ValueError(f"science.variants.{name}: only w_mim and alpha may differ between variants, "
                                 f"not {extra}")
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"science.eval_sets: duplicate names in {names}")
        return self


class Params(Section):
    """The whole ``params.yaml`` after the active preset is applied."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    preset: str | None = None
    seed: int = 0
    demo_data: DemoDataCfg = DemoDataCfg()
    ingest: IngestCfg = IngestCfg()
    validation: ValidateCfg = Field(ValidateCfg(), alias="validate")  # `validate` is a BaseModel method
    pretrain: PretrainCfg = PretrainCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    tracking: TrackingCfg = TrackingCfg()
    promote: PromoteCfg = PromoteCfg()
    retrain: RetrainCfg = RetrainCfg()
    science: ScienceCfg = ScienceCfg()
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_exclusions(self) -> Params:
        tasks = [t.name for t in self.finetune.tasks]
        unknown = sorted(set(self.validation.contamination_exclude) - set(tasks))
        if unknown:
            raise ValueError(
                f"validate.contamination_exclude: unknown task name(s) {unknown}; finetune.tasks are: "
                f"{', '.join(tasks) or '(none)'}"
            )
        self._check_pooled_rows()
        return self

    def _check_pooled_rows(self) -> None:
        """``evaluate.pretraining_seeds``: members are finetune models, each in one row of at least two."""
        models = {m.name for m in self.finetune.models}
        seen: dict[str, str] = {}
        for row, members in self.evaluate.pretraining_seeds.items():
            where = f"evaluate.pretraining_seeds.{row}"
            if len(members) < 2:
                raise ValueError(f"{where}: pools {len(members)} model(s); a pooled row needs two or more runs")
            if row in models and row not in members:
                raise ValueError(f"{where}: {row!r} is also a finetune model; name the pooled row otherwise")
            for m in members:
                if m not in models:
                    raise ValueError(f"{where}: {m!r} is not in finetune.models ({sorted(models)})")
                if m in seen:
                    raise ValueError(f"{where}: {m!r} is already pooled into {seen[m]!r}")
                seen[m] = row


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _preset_overrides(presets: dict[str, Any], name: str, source: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's overrides, on top of those of the preset it ``extends`` (recursively)."""
    overrides = presets.get(name)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: presets.{name}: expected a mapping")
    base = overrides.get("extends")
    overrides = {k: v for k, v in overrides.items() if k != "extends"}
    if base is None:
        return overrides
    if base in seen or base == name:
        raise ConfigError(f"{source}: presets.{name}.extends: a cycle through {' -> '.join((*seen, name, base))}")
    if base not in presets:
        valid = ", ".join(sorted(presets))
        raise ConfigError(f"{source}: presets.{name}.extends: unknown preset {base!r}; valid: {valid}")
    return _deep_merge(_preset_overrides(presets, base, source, (*seen, name)), overrides)


def parse_params(raw: dict[str, Any], *, source: str = "params", preset: str | None = None) -> Params:
    """Validate a raw mapping, applying ``preset`` (or the mapping's own ``preset`` key)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    name = preset if preset is not None else raw.get("preset")
    presets = raw.get("presets") or {}
    merged = dict(raw)
    if name:
        if name not in presets:
            valid = ", ".join(sorted(presets)) or "(none defined)"
            raise ConfigError(f"{source}: preset: unknown preset {name!r}; valid presets: {valid}")
        merged = _deep_merge(raw, _preset_overrides(presets, name, source))
    merged["preset"] = name or None
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_error(source + (f" (preset {name!r})" if name else ""), e)) from None


def load_params(path: str | Path = "params.yaml", preset: str | None = None) -> Params:
    """Load and validate ``params.yaml``; errors name the file, the key and the problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found (pass --params PATH)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw or {}, source=str(path), preset=preset)
