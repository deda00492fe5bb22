"""Downstream fine-tuning through the one training loop, then a test pass with per-sample scores.

``finetune(cfg, task, spec, seed=..., out_dir=...)``:

1. load the backbone named by ``spec`` (:func:`load_task_backbone`: a pretraining export, the ImageNet
   teacher's checkpoint, or a random init) at the task's input size; timm resamples Swin's relative-position
   tables when the window changes (geometric interpolation in torch, no SciPy);
2. attach a new ``TASK_HEADS[task.head]`` head (:mod:`gfm_core.models.heads`) and wrap both in the
   :class:`Finetune` objective (``forward(batch) -> {"loss", ...}``);
3. train with :func:`gfm_core.training.loop.fit` (warm-up + cosine, AdamW, layer-wise lr decay through
   ``param_groups(..., lr_scale_fn=...)``) on the task's train split (a seeded label-fraction subset);
4. run the test split once: torchmetrics values plus per-sample statistics (``scores.parquet``) for the paired
   bootstrap of :mod:`gfm_core.evaluation.report`; ``result.json`` holds the rest. Both are atomic writes.

Outputs: ``<finetune.out_dir>/<task>/<model>/seed_<seed>/`` holds ``result.json``, ``scores.parquet``,
``metrics.jsonl`` and ``checkpoints/``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gfm_core.config import BackboneSpec, FinetuneCfg, Params, TaskCfg
from gfm_core.errors import CheckpointError, ConfigError, DataValidationError
from gfm_core.evaluation.metrics import HEADLINES, TaskMetrics, build_metrics
from gfm_core.io import read_json, sha256_file, sha256_json, write_bytes, write_json
from gfm_core.models.backbones import load_backbone, load_timm_weights
from gfm_core.models.heads import TaskModel, build_task_model, head_class

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SCORES_FILE = "scores.parquet"
START_FILE = "backbone_start.json"  # which backbone bytes the run's checkpoints started from
TARGET_KEYS = {
    "classification": "label",
    "multilabel": "label",
    "segmentation": "mask",
    "change": "mask",
    "superres": "target",
}


# ------------------------------------------------------------------------------------------------ backbones


@dataclass
class LoadedBackbone:
    """A timm backbone at the task's geometry and the normalisation its weights expect."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str
    source: str  # weight file, or "random"
    sha256: str  # of the weight file's bytes as loaded; random: of the recipe (see backbone_sha256)


def _check_no_scipy_interp() -> None:
    from timm.layers import pos_embed_rel

    if getattr(pos_embed_rel, "_USE_SCIPY", False):
        raise ConfigError(
            "TIMM_USE_SCIPY_INTERP is set: timm would resample Swin position tables with "
            "scipy.interpolate.interp2d, which SciPy 1.14 removed; unset it (timm then interpolates in torch)"
        )


def _geometry(task: TaskCfg, drop_path_rate: float, swin_like: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"img_size": task.img_size, "drop_path_rate": drop_path_rate}
    if task.window_size is not None:
        if not swin_like:
            raise ConfigError(
                f"finetune.tasks[{task.name}].window_size is set but the backbone takes no window size"
            )
        kw["window_size"] = task.window_size
    return kw


def _norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = pcfg.get("mean"), pcfg.get("std")
    if mean is None or std is None:
        raise ConfigError(f"{type(model).__name__}: no mean/std in its pretrained_cfg")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _export_hint(spec: BackboneSpec) -> str:
    if spec.pretrain:
        return (
            f"produce it by pretraining with the overrides {spec.pretrain} "
            f"(gfm_core.finetune.baseline_pretrain_params(params, {spec.name!r}) -> stages.run_pretrain)"
        )
    return "produce it with `gfm pretrain` (stages.run_pretrain) or point finetune.models[].path at an export"


def backbone_sha256(spec: BackboneSpec) -> str:
    """What a fine-tuning run of ``spec`` starts from: the sha256 of its weight file (``export``, ``teacher``).

    A ``random`` backbone has no file: its identity is the sha256 of ``{kind, arch, timm_kwargs}``; with the
    run's seed (recorded next to it) that fixes the initial weights.

    Raises:
        CheckpointError: the weight file is missing.
    """
    if spec.kind == "random":
        return sha256_json({"kind": "random", "arch": spec.arch, "timm_kwargs": spec.timm_kwargs})
    assert spec.path is not None
    if not Path(spec.path).is_file():
        hint = _export_hint(spec) if spec.kind == "export" else "copy the weights there or fix the path"
        raise CheckpointError(
            f"finetune.models[{spec.name}].path: {spec.path} not found; {hint}"
        )
    return sha256_file(spec.path)


def load_task_backbone(spec: BackboneSpec, task: TaskCfg, *, drop_path_rate: float = 0.0) -> LoadedBackbone:
    """The backbone of ``spec`` built for ``task``'s input size (and Swin window), headless.

    The weight file is hashed before and after loading, so ``sha256`` names the bytes that were loaded.

    Raises:
        CheckpointError: a weight file is missing, does not match its arch, or changed while being loaded.
        ConfigError: unknown arch, a window size for a backbone without one, SciPy interpolation requested.
    """
    _check_no_scipy_interp()
    if spec.kind == "export" and spec.path is not None and not Path(spec.path).is_file():
        raise CheckpointError(
            f"{spec.path}: backbone export of model {spec.name!r} not found; {_export_hint(spec)}"
        )
    sha = backbone_sha256(spec)
    if spec.kind == "export":
        assert spec.path is not None
        side = Path(spec.path).with_suffix(".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        swin_like = "window_size" in (meta.get("timm_kwargs") or {})
        model = load_backbone(spec.path, **_geometry(task, drop_path_rate, swin_like), **spec.timm_kwargs)
        arch = str(meta.get("arch", "?"))
        source = str(spec.path)
    elif spec.kind == "teacher":
        assert spec.path is not None and spec.arch is not None
        swin_like = spec.arch.startswith("swin") or "window_size" in spec.timm_kwargs
        kw = {"num_classes": 0, **spec.timm_kwargs, **_geometry(task, drop_path_rate, swin_like)}
        model = load_timm_weights(
            spec.arch,
            spec.path,
            field=f"finetune.models[{spec.name}].path",
            arch_field=f"finetune.models[{spec.name}].arch",
            **kw,
        )
        arch, source = spec.arch, str(spec.path)
    else:
        assert spec.arch is not None
        if not timm.is_model(spec.arch):
            raise ConfigError(f"finetune.models[{spec.name}].arch: {spec.arch!r} is not a timm model name")
        swin_like = spec.arch.startswith("swin") or "window_size" in spec.timm_kwargs
        kw = {"num_classes": 0, **spec.timm_kwargs, **_geometry(task, drop_path_rate, swin_like)}
        try:
            model = timm.create_model(spec.arch, pretrained=False, **kw)
        except TypeError as e:
            if "img_size" not in str(e):
                raise ConfigError(f"finetune.models[{spec.name}]: {spec.arch} rejects {kw} ({e})") from e
            kw.pop("img_size")
            model = timm.create_model(spec.arch, pretrained=False, **kw)
        arch, source = spec.arch, "random"
    if spec.kind != "random" and backbone_sha256(spec) != sha:
        raise CheckpointError(
            f"{spec.path}: the backbone of model {spec.name!r} changed while it was being loaded (a pretraining "
            f"or copy still writing it?); re-run `gfm finetune --model {spec.name}` once it is complete"
        )
    mean, std = _norm(model)
    return LoadedBackbone(model, mean, std, arch, source, sha)


def layer_decay_fn(task_model: TaskModel, decay: float, prefix: str = "model.") -> Callable[[str], float]:
    """``name -> lr scale``: backbone layer ``i`` of ``n`` gets ``decay^(n - i)``, everything else 1.

    Layer ids come from timm's ``group_matcher(coarse=False)`` (patch embed = 0, one id per block, last block
    ``n - 1``), as timm's ``param_groups_layer_decay`` does; names are those of the objective
    (``<prefix>backbone.model.<timm name>``).
    """
    from timm.optim._param_groups import group_parameters

    backbone = task_model.backbone.model
    if decay == 1.0:
        return lambda name: 1.0
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(
            f"{type(backbone).__name__} has no group_matcher(): layer-wise lr decay needs timm's layer "
            f"grouping "
            f"(set finetune.layer_decay: 1.0 to switch it off)"
        )
    layer_map = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    n = max(layer_map.values()) + 1
    scales = {f"{prefix}backbone.model.{k}": decay ** (n - v) for k, v in layer_map.items()}
    return lambda name: scales.get(name, 1.0)


# ------------------------------------------------------------------------------------------------ objective


def _dice_loss(logits: Tensor, mask: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice of the change class; ``logits: [B, 2, H, W]``, ``mask: [B, H, W]`` in {0, 1}."""
    p = logits.float().softmax(1)[:, 1]
    t = mask.float()
    inter = (p * t).sum()
    return 1 - (2 * inter + eps) / (p.sum() + t.sum() + eps)


class Finetune(nn.Module):
    """The fine-tuning objective of one task: ``forward(batch) -> {"loss", <components>}`` (fit's contract).

    Losses: cross-entropy (classification), ``MultiLabelSoftMarginLoss`` (multilabel, as GFM's code),
    cross-entropy with ``ignore_index`` on logits resized to the mask (segmentation), cross-entropy + Dice of
    the change class (change), L1 in [0, 1] units against the HR target (superres).

    Args:
        model: backbone + head.
        head: the head name (a ``TASK_HEADS`` key).
        mean, std: the image normalisation (superres maps predictions back to [0, 1] with it).
        ignore_index: segmentation mask value that is not scored.
    """

    def __init__(
        self,
        model: TaskModel,
        head: str,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        head_class(head)
        self.model, self.head, self.ignore_index = model, head, ignore_index
        self.register_buffer(
            "mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)

    def _dense(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)

    def _pixels(self, out: Tensor, size: Sequence[int]) -> Tensor:
        """Superres output (normalised) -> [0, 1] units at the target size."""
        img = out.float() * self.std + self.mean
        if tuple(img.shape[-2:]) != tuple(size):
            shrink = size[0] < img.shape[-2]
            img = F.interpolate(img, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
        return img

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        out = self.model(batch["image"])
        head = self.head
        if head == "classification":
            label = batch["label"]
            loss = F.cross_entropy(out.float(), label)
            return {"loss": loss, "acc": (out.argmax(1) == label).float().mean().detach()}
        if head == "multilabel":
            return {"loss": F.multilabel_soft_margin_loss(out.float(), batch["label"].float())}
        if head == "segmentation":
            mask = batch["mask"]
            logits = self._dense(out, mask.shape[-2:])
            return {"loss": F.cross_entropy(logits, mask, ignore_index=self.ignore_index)}
        if head == "change":
            mask = batch["mask"]
            logits = self._dense(out, mask.shape[-2:])
            ce, dice = F.cross_entropy(logits, mask), _dice_loss(logits, mask)
            return {"loss": ce + dice, "ce": ce.detach(), "dice": dice.detach()}
        target = batch["target"]
        l1 = (self._pixels(out, target.shape[-2:]) - target.float()).abs().mean()
        return {"loss": l1, "l1": l1.detach()}

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> Tensor:
        """Metric-ready predictions.

        Probabilities ``[B, K]``, class maps ``[B, H, W]`` at the label's size, or images ``[B, C, H, W]`` in
        [0, 1].
        """
        out = self.model(batch["image"])
        head = self.head
        if head == "classification":
            return out.float().softmax(1)
        if head == "multilabel":
            return out.float().sigmoid()
        if head in ("segmentation", "change"):
            return self._dense(out, batch["mask"].shape[-2:]).argmax(1)
        return self._pixels(out, batch["target"].shape[-2:]).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class FinetuneResult:
    """One (task, model, seed) fine-tuning run and its test metrics."""

    task: str
    head: str
    model: str
    seed: int
    metrics: dict[str, float]
    headline: str
    steps: int
    train_samples: int
    test_samples: int
    seconds: float
    device: str
    out_dir: Path
    result_json: Path
    scores: Path
    backbone: dict[str, Any] = field(default_factory=dict)
    label_fraction: float = 1.0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The headline metric (ARP, bootstrap)."""
        return self.metrics[self.headline]

    @property
    def backbone_sha256(self) -> str | None:
        """What the run started from (:func:`backbone_sha256`); None for results written before it was recorded."""
        return self.backbone.get("sha256")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out_dir", "result_json", "scores"):
            d[k] = str(d[k])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FinetuneResult:
        d = dict(d)
        for k in ("out_dir", "result_json", "scores"):
            d[k] = Path(d[k])
        return cls(**d)


def result_dir(cfg: FinetuneCfg, task: str, model: str, seed: int) -> Path:
    """``<out_dir>/<task>/<model>/seed_<seed>``."""
    return Path(cfg.out_dir) / task / model / f"seed_{seed}"


def load_result(path: str | Path) -> FinetuneResult:
    """Read a ``result.json`` (or the run folder holding one).

    Raises:
        CheckpointError: missing or unreadable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: fine-tuning result not found (run gfm finetune for it first)")
    try:
        return FinetuneResult.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a fine-tuning result ({e})") from e


def save_scores(
    path: Path, ids: Sequence[str], stats: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Per-sample statistics as parquet (one row per test sample; N-D stats flattened, shapes in metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {"id": pa.array(list(ids), pa.string())}
    shapes = {}
    for k, v in stats.items():
        if len(v) != len(ids):
            raise ValueError(f"{k}: {len(v)} rows for {len(ids)} samples")
        shapes[k] = list(v.shape[1:])
        if v.ndim == 1:
            cols[k] = pa.array(v)
        else:
            flat = v.reshape(len(v), -1)
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    table = pa.table(cols).replace_schema_metadata({"gfm": json.dumps({"shapes": shapes, **meta})})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return write_bytes(path, buf.getvalue())


def load_scores(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(ids, stats)`` written by :func:`save_scores`.

    Raises:
        CheckpointError: missing or unreadable.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: per-sample scores not found (rerun gfm finetune for this result)")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"gfm"])
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise CheckpointError(f"{path}: cannot read per-sample scores ({type(e).__name__}: {e})") from e
    ids = [str(v) for v in table.column("id").to_pylist()]
    stats = {}
    for k, shape in meta["shapes"].items():
        col = table.column(k).combine_chunks()
        flat = col.values if shape else col
        stats[k] = np.array(flat.to_numpy(zero_copy_only=False)).reshape(len(ids), *shape)  # a writable copy
    return ids, stats


# ------------------------------------------------------------------------------------------------ driver


def _loader_factory(
    dataset: Any, batch_size: int, num_workers: int, seed: int, rank: int = 0, world: int = 1
) -> Callable[[int], DataLoader]:
    """``epoch -> DataLoader`` over this rank's share of a seeded permutation (the same on every rank)."""
    per_rank = len(dataset) // world

    def factory(epoch: int) -> DataLoader:
        order = torch.randperm(
            len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order[rank * per_rank : (rank + 1) * per_rank].tolist(),
            num_workers=num_workers,
            drop_last=True,
            persistent_workers=False,
        )

    return factory


def evaluate_objective(
    objective: Finetune, loader: DataLoader, metrics: TaskMetrics, device: torch.device
) -> tuple[dict[str, float], list[str], dict[str, np.ndarray]]:
    """One pass over ``loader`` in eval mode: ``(metrics, sample ids, per-sample stats)``."""
    from gfm_core.training.backends import move_to

    was_training = objective.training
    objective.eval()
    ids: list[str] = []
    key = TARGET_KEYS[objective.head]
    try:
        for batch in loader:
            batch = move_to(batch, device)
            pred = objective.predict(batch)
            metrics.update(pred, batch[key])
            ids.extend(batch["id"])
    finally:
        objective.train(was_training)
    return metrics.compute(), ids, metrics.per_sample()


def finetune(
    cfg: FinetuneCfg,
    task: TaskCfg,
    spec: BackboneSpec,
    *,
    seed: int,
    out_dir: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = False,
    callbacks: Sequence[Any] = (),
) -> FinetuneResult:
    """Fine-tune ``spec``'s backbone on ``task`` with a new head, then test it (module docstring).

    Args:
        cfg: the ``finetune`` section (schedule, batch, layer decay, ...).
        task: the task section.
        spec: the backbone source.
        seed: head init, data order, augmentation (and the subset when ``cfg.subset_seed`` is None).
        out_dir: run folder (checkpoints, metrics.jsonl, result.json, scores.parquet).
        max_steps: cap on optimizer steps (overrides ``task.max_steps``/``cfg.max_steps``).

    Raises:
        ConfigError, CheckpointError, DatasetNotFoundError, DataValidationError: bad config, weights or data.
    """
    from gfm_core.data.tasks.dataset import TaskDataset, label_subset
    from gfm_core.data.tasks.layouts import list_task
    from gfm_core.training.backends import TorchBackend, auto_device
    from gfm_core.training.checkpoint import seed_everything
    from gfm_core.training.loop import LoopCfg, fit
    from gfm_core.training.optim import param_groups
    from gfm_core.training.schedule import scale_lr

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device = auto_device(cfg.device)
    seed_everything(seed)
    loaded = load_task_backbone(spec, task, drop_path_rate=cfg.drop_path_rate)
    _bind_start(out_dir / START_FILE, spec, loaded.sha256, resume)

    n_train = len(list_task(task, "train").refs)
    subset = label_subset(
        n_train, task.label_fraction, cfg.subset_seed if cfg.subset_seed is not None else seed
    )
    cache = cfg.cache_samples
    train_ds = TaskDataset(
        task,
        "train",
        mean=loaded.mean,
        std=loaded.std,
        train=True,
        augment=cfg.augment,
        indices=subset,
        cache=cache,
    )
    test_ds = TaskDataset(task, "test", mean=loaded.mean, std=loaded.std, cache=False)
    in_chans = int(getattr(loaded.model, "in_chans", None) or len(loaded.mean))
    if train_ds.channels != in_chans:
        raise ConfigError(
            f"task {task.name!r} reads {train_ds.channels} bands but backbone {spec.name!r} ({loaded.arch}) "
            f"takes "
            f"{in_chans}; set finetune.tasks[{task.name}].bands (e.g. [3, 2, 1] for Landsat RGB)"
        )
    num_outputs = train_ds.num_outputs
    seed_everything(seed)  # the head's init depends on the seed only, not on what was loaded before
    model = build_task_model(task.head, loaded.model, num_outputs=num_outputs, decoder_dim=cfg.decoder_dim)
    objective = Finetune(model, task.head, mean=loaded.mean, std=loaded.std, ignore_index=task.ignore_index)

    batch = min(task.batch_size or cfg.batch_size, len(train_ds))
    if batch < (task.batch_size or cfg.batch_size):
        log.warning("task %s: batch size reduced to the %d training samples", task.name, batch)
    backend = TorchBackend(device, cfg.precision)
    world = backend.world_size
    steps_per_epoch = len(train_ds) // world // batch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"task {task.name!r}: {len(train_ds)} training samples give no full step of batch {batch} x "
            f"grad_accum {cfg.grad_accum} x {world} rank(s)"
        )
    epochs = task.epochs or cfg.epochs
    limit = max_steps or task.max_steps or cfg.max_steps
    total = epochs * steps_per_epoch if limit is None else min(epochs * steps_per_epoch, limit)
    global_batch = batch * cfg.grad_accum * world
    loop_cfg = LoopCfg(
        total_steps=total,
        out_dir=out_dir,
        grad_accum=cfg.grad_accum,
        base_lr=scale_lr(cfg.base_lr, global_batch),
        warmup_lr=scale_lr(cfg.warmup_lr, global_batch),
        min_lr=scale_lr(cfg.min_lr, global_batch),
        warmup_steps=round(total * cfg.warmup_fraction),
        betas=cfg.betas,
        clip_grad=cfg.clip_grad,
        log_every=min(cfg.log_every, total),
        checkpoint_every=total,
        keep_checkpoints=1,
        seed=seed,
        resume=resume,
        discard_old=True,  # one end-of-run checkpoint per run; the product is the result JSON
        progress=progress,
        fused_optimizer=True,  # TorchBackend
    )
    groups = param_groups(objective, cfg.weight_decay, lr_scale_fn=layer_decay_fn(model, cfg.layer_decay))
    log.info(
        "finetune %s on %s (seed %d): %d train / %d test samples, %d steps of batch %d, %s on %s",
        spec.name,
        task.name,
        seed,
        len(train_ds),
        len(test_ds),
        total,
        global_batch,
        cfg.precision,
        device,
    )
    fit_res = fit(
        objective,
        _loader_factory(train_ds, batch, cfg.num_workers, seed, backend.rank, world),
        backend,
        loop_cfg,
        groups,
        callbacks=callbacks,
    )

    test_loader = DataLoader(
        test_ds, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers
    )
    metrics = build_metrics(task.head, num_outputs, task.ignore_index)
    values, ids, stats = evaluate_objective(backend.module, test_loader, metrics, backend.device)
    headline = task.headline or HEADLINES[task.head]
    if headline not in values:
        raise ConfigError(f"finetune.tasks[{task.name}].headline {headline!r} is not one of {sorted(values)}")
    result = FinetuneResult(
        task=task.name,
        head=task.head,
        model=spec.name,
        seed=seed,
        metrics=values,
        headline=headline,
        steps=fit_res.steps,
        train_samples=len(train_ds),
        test_samples=len(test_ds),
        seconds=round(time.perf_counter() - t0, 2),
        device=device,
        out_dir=out_dir,
        result_json=out_dir / RESULT_FILE,
        scores=out_dir / SCORES_FILE,
        backbone={"kind": spec.kind, "arch": loaded.arch, "source": loaded.source, "sha256": loaded.sha256},
        label_fraction=task.label_fraction,
        history=[{k: v for k, v in r.items() if math.isfinite(v)} for r in fit_res.history],
    )
    if backend.is_main:  # every rank tests (same numbers), one writes
        meta = {"task": task.name, "head": task.head, "model": spec.name, "seed": seed, "headline": headline}
        save_scores(result.scores, ids, stats, meta)
        write_json(result.result_json, result.to_json())
    backend.barrier()
    log.info(
        "finetune %s on %s (seed %d): %s",
        spec.name,
        task.name,
        seed,
        ", ".join(f"{k}={v:.4g}" for k, v in values.items() if not k.startswith("iou_")),
    )
    return result


def _bind_start(path: Path, spec: BackboneSpec, sha: str, resume: bool) -> None:
    """Record the backbone a run starts from; a resumed run must continue from checkpoints of the same bytes.

    Raises:
        CheckpointError: resuming a run whose checkpoints started from other (or unrecorded) backbone bytes.
    """
    if resume and (path.parent / "checkpoints").is_dir():
        before = read_json(path).get("sha256") if path.is_file() else None
        if before != sha:
            raise CheckpointError(
                f"{path}: the checkpoints of this run started from backbone sha256 {before or 'unrecorded'}, "
                f"{spec.path or spec.name} is now {sha}; re-run `gfm finetune --model {spec.name}` without resume"
            )
        return
    write_json(path, {"model": spec.name, "kind": spec.kind, "sha256": sha, "source": str(spec.path or "random")})


# ------------------------------------------------------------------------------------------------ stage API


def get_task(params: Params, name: str) -> TaskCfg:
    """The task section named ``name``.

    Raises:
        ConfigError: no such task (the message lists the configured ones).
    """
    for t in params.finetune.tasks:
        if t.name == name:
            return with_pile_stretch(params, t)
    valid = ", ".join(t.name for t in params.finetune.tasks) or "(none configured)"
    raise ConfigError(f"finetune.tasks: unknown task {name!r}; valid: {valid}")


def with_pile_stretch(params: Params, task: TaskCfg) -> TaskCfg:
    """``task`` with ``stretch`` set from its ``stretch_source``'s recorded stretch (unchanged without one).

    Raises:
        DataValidationError: no statistics yet, or the pile source has no stretch.
    """
    if task.stretch_source is None:
        return task
    from gfm_core.data.ingest.stats import load_stretches

    path = params.ingest.out_dir / "norm_stats.json"
    stretches = load_stretches(path) if path.is_file() else {}
    if task.stretch_source not in stretches:
        raise DataValidationError(
            f"{path}: no contrast stretch of pile source {task.stretch_source!r} (finetune.tasks[{task.name}]."
            f"stretch_source); run `gfm ingest` with ingest.stretch set, or drop stretch_source"
        )
    st = stretches[task.stretch_source]
    return task.model_copy(update={"stretch": (st.lo, st.hi)})


def get_model(params: Params, name: str) -> BackboneSpec:
    """The model (backbone source) named ``name``.

    Raises:
        ConfigError: no such model (the message lists the configured ones).
    """
    for m in params.finetune.models:
        if m.name == name:
            return m
    valid = ", ".join(m.name for m in params.finetune.models) or "(none configured)"
    raise ConfigError(f"finetune.models: unknown model {name!r}; valid: {valid}")


def run_finetune_task(
    params: Params,
    task: str,
    model_name: str,
    seed: int | None = None,
    *,
    max_steps: int | None = None,
    resume: bool = False,
) -> FinetuneResult:
    """Stage entry point: fine-tune one model on one task for one seed (default: the first of seeds)."""
    cfg = params.finetune
    seed = cfg.seeds[0] if seed is None else seed
    return finetune(
        cfg,
        get_task(params, task),
        get_model(params, model_name),
        seed=seed,
        out_dir=result_dir(cfg, task, model_name, seed),
        max_steps=max_steps,
        resume=resume,
    )


def run_finetune(
    params: Params,
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[FinetuneResult]:
    """Every (task, model, seed) of the params (or the given subsets), in that order."""
    cfg = params.finetune
    task_names = list(tasks) if tasks else [t.name for t in cfg.tasks]
    model_names = list(models) if models else [m.name for m in cfg.models]
    for name in task_names:
        get_task(params, name)
    for name in model_names:
        get_model(params, name)
    return [
        run_finetune_task(params, t, m, s)
        for t in task_names
        for m in model_names
        for s in (seeds or cfg.seeds)
    ]


def baseline_pretrain_params(params: Params, model_name: str) -> Params:
    """``params`` with the ``pretrain`` section overridden by ``finetune.models[model_name].pretrain``.

    The MIM-only (``alpha: 0``) and distill-only (``w_mim: 0``) baselines are pretraining runs of their own;
    their overrides (and ``out_dir``, whose ``backbone.safetensors`` is the model's ``path``) live next to the
    model. Pass the result to ``stages.run_pretrain``.

    Raises:
        ConfigError: unknown model, a model without pretrain overrides, or invalid overrides.
    """
    from gfm_core.config import _deep_merge

    spec = get_model(params, model_name)
    if not spec.pretrain:
        raise ConfigError(
            f"finetune.models[{model_name}] has no pretrain overrides (it is not a pretraining baseline)"
        )
    merged = _deep_merge(params.pretrain.model_dump(mode="json"), dict(spec.pretrain))
    try:
        return params.model_copy(update={"pretrain": type(params.pretrain).model_validate(merged)})
    except Exception as e:  # pydantic ValidationError
        raise ConfigError(f"finetune.models[{model_name}].pretrain: invalid overrides ({e})") from e


__all__ = [
    "Finetune",
    "FinetuneResult",
    "LoadedBackbone",
    "backbone_sha256",
    "baseline_pretrain_params",
    "evaluate_objective",
    "finetune",
    "get_model",
    "get_task",
    "layer_decay_fn",
    "load_result",
    "load_scores",
    "load_task_backbone",
    "result_dir",
    "run_finetune",
    "run_finetune_task",
    "save_scores",
]
