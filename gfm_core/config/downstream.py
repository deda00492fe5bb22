"""The downstream sections: tasks, the models fine-tuned on them (derived from pretraining where
unnamed), fine-tuning and the evaluation report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from gfm_core.config.base import Section
from gfm_core.config.pretrain import PretrainCfg
from gfm_core.task_heads import HEADS

TaskLayout = Literal["ucmerced", "resisc45", "eurosat", "bigearthnet", "oscd", "levircd", "folders", "geobench"]
Decoder = Literal["fpn", "upernet"]  # gfm_core.models.decoders.DECODERS
DECODER_HEADS = ("segmentation", "change")  # the heads whose decoder finetune.decoder / tasks[].decoder choose
#: What a fine-tuning run trains (``finetune.protocol``; gfm_core.objectives.protocols).
FinetuneProtocol = Literal["finetune", "frozen", "linear"]
#: The heads a ``linear`` probe fits: pooled features -> one linear layer.
LINEAR_PROBE_HEADS = ("classification", "multilabel")


class TaskCfg(Section):
    """One downstream task: its local data folder and layout, head, input geometry and label handling.

    Images are read band by band (``bands`` / ``band_names`` / ``band_files``), scaled to [0, 1] with
    ``value_range``, resized to ``img_size`` and normalised with the backbone's own mean/std. Labels (masks, change
    maps, HR targets) stay at their native size; predictions are resized to them.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    head: str = Field(description="a row of gfm_core.task_heads.HEADS: " + ", ".join(HEADS))
    layout: TaskLayout
    root: Path
    img_size: int = Field(ge=16, description="backbone input size in pixels (images are resized to it)")
    window_size: int | None = Field(None, ge=1, description="Swin window at img_size; None = the backbone's")
    bands: tuple[int, ...] | None = Field(
        None, description="1-based band indexes of multi-band files, in order (Landsat RGB: [3, 2, 1])"
    )
    band_names: tuple[str, ...] | None = Field(
        None, description="bands of multi-band files chosen by name from the files' band descriptions, in order "
        "(case-insensitive; Sentinel-2 codes and common names match each other): [red, green, blue]; not with bands",
    )
    band_files: tuple[str, ...] = Field(
        ("B04", "B03", "B02"), description="per-band file names of the bigearthnet/oscd layouts (RGB)"
    )
    value_range: tuple[float, float] | None = Field(
        None, description="(lo, hi) mapped to [0, 1]; None = the file dtype's default (gfm_core.data.raster.reader)"
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
        None, description="label names (None: geobench = classes.json; bigearthnet = info.json, else BigEarthNet's 19)"
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
    protocol: FinetuneProtocol | None = Field(None, description="override finetune.protocol for this task")
    epochs: int | None = Field(None, ge=1, description="override finetune.epochs")
    max_steps: int | None = Field(None, ge=1, description="override finetune.max_steps")
    eval_every: int | None = Field(None, ge=1, description="override finetune.eval_every")
    batch_size: int | None = Field(None, ge=1, description="override finetune.batch_size")
    decoder: Decoder | None = Field(None, description="override finetune.decoder (segmentation, change heads)")

    @model_validator(mode="after")
    def _check(self) -> TaskCfg:
        if self.head not in HEADS:
            raise ValueError(f"task {self.name!r}: unknown head {self.head!r}; valid: {', '.join(HEADS)}")
        valid = HEADS[self.head].layouts
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
        if self.decoder is not None and self.head not in DECODER_HEADS:
            heads = " and ".join(DECODER_HEADS)
            raise ValueError(f"task {self.name!r}: decoder is an option of the {heads} heads, not {self.head!r}")
        if self.band_names is not None:
            if self.bands is not None:
                raise ValueError(f"task {self.name!r}: give bands (indexes) or band_names, not both")
            if not self.band_names or self.layout in ("bigearthnet", "oscd"):
                raise ValueError(
                    f"task {self.name!r}: band_names must name bands of multi-band files (layout {self.layout!r} "
                    "reads one file per band: use band_files)"
                )
        if self.value_range is not None and not self.value_range[1] > self.value_range[0]:
            raise ValueError(f"task {self.name!r}: value_range must be (lo, hi) with hi > lo")
        if self.protocol == "linear":
            _check_linear([self], f"finetune.tasks[{self.name}].protocol")
        return self


def _check_linear(tasks: list[TaskCfg], key: str) -> None:
    """Refuse a linear probe of tasks whose head is dense (a linear layer on pooled features has no mask)."""
    dense = [f"{t.name} ({t.head})" for t in tasks if t.head not in LINEAR_PROBE_HEADS]
    if dense:
        raise ValueError(
            f"{key}: linear is a linear probe of pooled features for {'/'.join(LINEAR_PROBE_HEADS)} heads; "
            f"task(s) {', '.join(dense)} need a dense head: use protocol frozen (frozen backbone, the task's own "
            f"head trained), or set protocol: linear per task (finetune.tasks[<name>].protocol)"
        )


class BackboneSpec(Section):
    """Where a fine-tuned model's backbone comes from; every baseline gets the same heads and budget.

    ``export``: a backbone written by pretraining (``path`` = ``backbone.safetensors`` + JSON sidecar; default:
    the export of ``pretrain`` or of its ablation ``ablation``).
    ``teacher``: a timm model loaded from a local checkpoint (``arch`` + ``path``; default: the pretraining
    teacher, the ImageNet baseline, which then follows the teacher the export was distilled from: ``teacher_of``).
    ``random``: ``arch`` + ``timm_kwargs``, randomly initialised (default: the student's architecture).
    The defaults are filled in when the params are loaded (:func:`derive_models`).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["export", "teacher", "random"]
    path: Path | None = None
    arch: str | None = None
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    ablation: str | None = Field(None, description="export: the pretrain.ablations entry that wrote it")
    teacher_of: Path | None = Field(
        None, description="teacher: an export whose sidecar names the teacher it was distilled from; when that "
        "teacher's file is there with the recorded sha256 and is another file than path, it is loaded instead (a "
        "retraining on a released teacher compares its student with that teacher)",
    )
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> BackboneSpec:
        if self.kind in ("export", "teacher") and self.path is None:
            raise ValueError(f"model {self.name!r}: kind {self.kind!r} needs a path (a local weight file)")
        if self.kind in ("teacher", "random") and not self.arch:
            raise ValueError(f"model {self.name!r}: kind {self.kind!r} needs an arch (a timm model name)")
        if self.teacher_of is not None and self.kind != "teacher":
            raise ValueError(f"model {self.name!r}: only a teacher follows an export's teacher (teacher_of)")
        if self.ablation is not None and self.kind != "export":
            raise ValueError(f"model {self.name!r}: only an export comes from a pretraining ablation")
        return self


def derive_models(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` params with ``finetune.models`` completed from the ``pretrain`` section.

    An ``export`` without ``path`` is the export of ``pretrain`` (or of its ``ablation``); a ``teacher`` without
    ``arch`` is the pretraining teacher; a ``random`` without ``arch`` is the student's architecture (its
    width, depths, heads and window). Each of ``finetune.ablations`` becomes an ``export`` model of its name.
    """
    ft, pre_raw = raw.get("finetune") or {}, raw.get("pretrain") or {}
    ft = ft.model_dump() if isinstance(ft, BaseModel) else dict(ft)
    if not ft.get("models") and not ft.get("ablations"):
        return raw
    try:
        pre = pre_raw if isinstance(pre_raw, PretrainCfg) else PretrainCfg.model_validate(pre_raw)
    except ValidationError:
        return raw  # the section's own validation reports it, with its keys
    models = [m.model_dump() if isinstance(m, BaseModel) else dict(m) for m in ft.get("models") or ()]
    names = {m.get("name") for m in models}
    models += [{"name": a, "kind": "export", "ablation": a} for a in ft.get("ablations") or () if a not in names]
    for m in models:
        if m.get("kind") == "export" and m.get("path") is None:
            m["path"] = str(pre.ablation_dir(m.get("ablation")) / "backbone.safetensors")
        elif m.get("kind") == "teacher" and not m.get("arch"):
            if not m.get("path"):  # the pretraining teacher itself: the one the export was distilled from
                m.setdefault("teacher_of", str(pre.out_dir / "backbone.safetensors"))
            m.update(arch=pre.teacher.arch, path=m.get("path") or pre.teacher.checkpoint,
                     timm_kwargs=m.get("timm_kwargs") or dict(pre.teacher.timm_kwargs))
        elif m.get("kind") == "random" and not m.get("arch"):
            st = pre.student
            shape = {k: getattr(st, k) for k in ("embed_dim", "depths", "num_heads") if getattr(st, k) is not None}
            m.update(arch=st.arch, timm_kwargs={**shape, "window_size": st.window_size, **(m.get("timm_kwargs") or {})})
    return {**raw, "finetune": {**ft, "models": models}}


class FinetuneCfg(Section):
    """Downstream fine-tuning (paper section 3; GFM's main_finetune.py recipe).

    The same schedule and budget for every model; ``base_lr``/``warmup_lr``/``min_lr`` are scaled by
    global batch / 512. Layer-wise lr decay multiplies layer ``id``'s lr by ``layer_decay^(last_id - id)``: on
    Swin the paper's ids (patch embedding 0, block ``j`` ``j + 1``, patch merging its previous block, final
    norm and head ``sum(depths) + 1``: scale 1), on other timm models timm's ``param_groups_layer_decay`` ids
    (:func:`gfm_core.training.optim.layer_decay_fn`). Classification and multilabel training can use the
    paper's regularisation: RandomResizedCrop, vertical flips, Mixup/CutMix and label smoothing (off by
    default; on in the paper preset).
    """

    tasks: tuple[TaskCfg, ...] = ()
    models: tuple[BackboneSpec, ...] = ()
    ablations: tuple[str, ...] = Field(
        (), description="pretrain.ablations fine-tuned as models of their own name (after finetune.models)"
    )
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    subset_seed: int | None = Field(42, description="seed of the label-fraction subset; None = the run seed")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(100, ge=1)
    warmup_epochs: int = Field(20, ge=0, description="paper: 20 of 100 epochs (the same share of a max_steps run)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    lr_scaling: Literal["linear", "none"] = Field(
        "linear", description="linear: lrs x global batch / 512 (the paper's rule); none: as written"
    )
    base_lr: float = Field(1e-4, gt=0)
    warmup_lr: float = Field(1e-7, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(0.9, gt=0, le=1)
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = Field(5.0, gt=0)
    decoder_dim: int = Field(256, ge=8, description="channels of the dense heads' decoder")
    decoder: Decoder = Field(
        "fpn", description="decoder of the segmentation and change heads: fpn | upernet (UPerNet: PPM + FPN, as "
        "MMSegmentation's UPerHead); super-resolution keeps its FPN"
    )
    protocol: FinetuneProtocol = Field(
        "finetune", description="finetune: backbone and head train (the paper); frozen: the backbone's weights "
        "and BatchNorm statistics stay fixed (eval mode), only the head trains (PANGAEA); linear: frozen "
        "backbone, pooled features -> one linear layer (classification/multilabel tasks only)",
    )
    scoring: Literal["test", "paper"] = Field(
        "test", description="test: the test split scored once, after training (honest, the default); paper: "
        "the val split scored after every epoch, the best epoch's metrics reported (GFM's main_finetune.py, "
        "for comparison with the paper's numbers)",
    )
    eval_every: int | None = Field(
        None, ge=1, description="scoring paper: score val every this many optimizer steps (None = every epoch, as "
        "GFM; iteration-budget tasks as MMSegmentation's 40k schedules: 4000)",
    )
    augment: bool = Field(True, description="random horizontal flips of training samples (false: no augmentation)")
    vflip: bool = Field(False, description="also random vertical flips of training samples, every head (paper: on)")
    crop_scale: tuple[float, float] | None = Field(
        None, description="classification/multilabel: RandomResizedCrop of this share of the area, aspect 3/4..4/3, "
        "of training samples (paper: [0.67, 1.0]); None = off",
    )
    mixup: float = Field(0.0, ge=0, description="classification/multilabel: Mixup alpha (paper: 0.8); 0 = off")
    cutmix: float = Field(0.0, ge=0, description="classification/multilabel: CutMix alpha (paper: 1.0); 0 = off")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="classification/multilabel: label smoothing of the targets (paper: 0.1)"
    )
    cache_samples: bool = Field(False, description="keep decoded training images in memory (small sets)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2, 3] = 0
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
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be < epochs {self.epochs}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"finetune.seeds: duplicates in {list(self.seeds)}")
        if self.protocol == "linear":
            _check_linear([t for t in self.tasks if t.protocol is None], "finetune.protocol")
        if self.scoring == "paper" and self.backend == "deepspeed" and self.zero_stage == 3:
            raise ValueError("finetune.scoring: paper scores val on rank 0 during training, which ZeRO-3's "
                             "partitioned weights do not allow; use zero_stage <= 2 or scoring: test")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"finetune.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got "
                             f"{list(self.crop_scale)}")
        return self

    def protocol_of(self, task: TaskCfg) -> FinetuneProtocol:
        """The protocol ``task`` is fine-tuned with: its own override, else ``protocol``."""
        return task.protocol or self.protocol


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
    iqm: bool = Field(True, description="add the GEO-Bench-2 aggregation: IQM over tasks of min-max normalised "
                      "scores, stratified bootstrap intervals, results_and_parameters.csv")
    min_seeds: int = Field(5, ge=1, description="fewer runs of a (model, task) mark its IQM interval weak "
                           "(GEO-Bench-2 asks for 5)")
    out_dir: Path = Path("outputs/evaluate")
