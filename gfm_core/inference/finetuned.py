"""A fine-tuned task model rebuilt from its run folder (``<finetune.out_dir>/<task>/<model>/seed_<s>/``).

What a fine-tuning run keeps: ``result.json`` (task, model, head, the sha256 of the backbone bytes it started
from) and its end-of-run checkpoint (``checkpoints/step_N/state.pt``, torch backend: the objective's state dict,
``model.`` + the task model's keys). What it does not keep: the head's geometry and the data recipe, which come
from the params the run was trained with (the same ``params.yaml``/preset): the task section (input size, bands,
value range, contrast stretch, decoder) and the model section (where the backbone's weights are). The number of
outputs is read from the checkpoint's classifier. The model is the *last* step's weights (under
``scoring: paper`` the reported score is the best validation epoch's, which is not stored).

Supported heads: ``segmentation`` (logits ``[B, K, H, W]``), ``superres`` (``[B, C, H, W]`` in ``[0, 1]``) and
``change`` (siamese: ``[B, 2, C, H, W]`` -> 2-class logits; two co-registered scenes, see
:mod:`~gfm_core.inference.pairs`); the classification heads give no map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from gfm_core.config import Params
from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.inference.bands import RGB, BandContract
from gfm_core.inference.source import LoadedModel
from gfm_core.io import read_json

PREDICT_HEADS = ("segmentation", "superres", "change")


class SuperResPixels(nn.Module):
    """A super-resolution task model's output in ``[0, 1]`` pixel units (its head's ``pixels``, clamped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W]`` (normalised) -> ``[B, C, H, W]`` in ``[0, 1]``."""
        out = self.model(x)
        head = cast(Any, self.model).head
        return cast(Tensor, head.pixels(out, out.shape[-2:]).clamp(0, 1))


def _state(run_dir: Path) -> dict[str, Tensor]:
    """The task model's weights of the run's latest checkpoint (``model.`` prefix removed)."""
    from gfm_core.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint under checkpoints/ (the fine-tuning did not finish "
                              f"or its checkpoints were removed); re-run gfm finetune for it")
    path = ckpt / "state.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; only torch-backend checkpoints can be loaded for prediction")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # corrupt file, foreign pickle, no "model" entry
        raise CheckpointError(f"{path}: cannot read the model weights ({type(e).__name__}: {e})") from e
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _num_outputs(head: str, state: dict[str, Tensor], in_chans: int, where: Path) -> int:
    if head == "superres":
        return in_chans
    weight = state.get("head.classifier.weight")
    if weight is None:
        raise CheckpointError(f"{where}: no head.classifier.weight in the checkpoint (not a {head} task model)")
    return int(weight.shape[0])


def load_finetuned(run_dir: str | Path, params: Params) -> tuple[LoadedModel, dict[str, Any]]:
    """The task model of a fine-tuning run, its band contract, provenance, and the task's read options.

    Returns:
        ``(loaded, read_options)``: ``read_options`` holds the task's ``bands``, ``band_names`` and
        ``value_range`` (defaults for :func:`~gfm_core.inference.predict.predict_scene`), ``output``, and
        ``pair`` (True for a change model: it needs the two dates).

    Raises:
        CheckpointError: no result/checkpoint, the backbone bytes changed since fine-tuning, or weights that do
            not fit the rebuilt model. ConfigError: a head that gives no map, or a task/model not in ``params``.
    """
    from gfm_core.models.heads import build_task_model
    from gfm_core.models.loading import load_task_backbone

    run_dir = Path(run_dir)
    result = read_json(run_dir / "result.json") if (run_dir / "result.json").is_file() else None
    if not isinstance(result, dict):
        raise CheckpointError(f"{run_dir}: no result.json (a fine-tuning run folder: <finetune.out_dir>/<task>/"
                              f"<model>/seed_<s>)")
    if result.get("head") not in PREDICT_HEADS:
        raise ConfigError(f"{run_dir}: head {result.get('head')!r} gives no map; predict supports "
                          f"{', '.join(PREDICT_HEADS)}")
    task, spec = params.task(result["task"]), params.model(result["model"])
    started_from = result.get("backbone") or {}
    if spec.kind == "teacher" and started_from.get("source") and started_from.get("arch"):
        # the teacher this run was fine-tuned from (a followed teacher too), not whichever the export names today
        spec = spec.model_copy(update={"path": Path(started_from["source"]), "arch": started_from["arch"],
                                       "teacher_of": None})
    loaded = load_task_backbone(spec, task)
    started = (result.get("backbone") or {}).get("sha256")
    if started != loaded.sha256:
        raise CheckpointError(f"{run_dir}: fine-tuned from backbone sha256 {str(started)[:12]}, but model "
                              f"{spec.name!r} is now {loaded.sha256[:12]}; re-run gfm finetune or restore the weights")
    state = _state(run_dir)
    c = len(loaded.mean)
    ft = params.finetune
    model = build_task_model(task.head, loaded.model, num_outputs=_num_outputs(task.head, state, c, run_dir),
                             decoder_dim=ft.decoder_dim, decoder=task.decoder or ft.decoder,
                             ignore_index=task.ignore_index, mean=loaded.mean, std=loaded.std)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{run_dir}: checkpoint does not fit the rebuilt {task.head} model (same params as "
                              f"the fine-tuning? protocol {result.get('protocol')}): {str(e)[:400]}") from e
    names = tuple(task.band_names) if task.band_names else (RGB if c == 3 else tuple(f"band{i}" for i in
                                                                                    range(1, c + 1)))
    contract = BandContract(names, loaded.mean, loaded.std, (c, task.img_size, task.img_size), stretch=task.stretch)
    info = {"task": task.name, "head": task.head, "model": spec.name, "run": str(run_dir),
            "backbone_sha256": loaded.sha256, "arch": loaded.arch}
    net: nn.Module = SuperResPixels(model) if task.head == "superres" else model
    options = {"bands": task.bands, "band_names": task.band_names, "value_range": task.value_range,
               "output": "values" if task.head == "superres" else "classes", "pair": task.head == "change"}
    return LoadedModel(net, contract, info), options
