"""Is pretraining learning? Held-out views measured at every logged step against trivial predictors.

Training losses fall for a model that memorises its crops as well as for one that learns, and a masked L1 of
0.5 means nothing without a reference. :class:`HoldoutProbe` keeps fixed views of held-out images (never
drawn by training; :meth:`~gfm_core.data.pretrain.stream.PretrainStream.holdout_samples`) with fixed masks and
reports, at every logged step:

- ``mim_holdout``: the student's masked L1 on them (eval mode), and ``mim_trivial_holdout``: the masked L1 of
  predicting each view's *visible* mean colour (per channel) in every masked pixel;
- ``cos_holdout``: the mean cosine between the projected student feature (of the masked view, as in training)
  and the teacher's target, and ``cos_mean_vector_holdout``: the mean cosine of each target with the best
  constant direction (the mean of the unit-normalised targets). Only with a teacher.

A student that has learned something beats both references; ``mim_holdout / mim_trivial_holdout`` and
``cos_holdout - cos_mean_vector_holdout`` are the numbers to read. The probe also keeps the predictions of a
few views at the start so :meth:`save_reconstructions` shows start and end side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gfm_core.losses import masked_l1

PREVIEWS = 4
COLUMNS = ("input", "masked", "prediction (start)", "prediction (end)", "visible + prediction (end)")


class HoldoutProbe:
    """Callback measuring learning on held-out views (module docstring); run on rank 0 only.

    Args:
        objective: the :class:`~gfm_core.objectives.ContinualPretrain` being trained (not a wrapper).
        samples: ``{"image": [N, C, S, S] normalised, "mask": [N, h, w]}`` held-out views.
        targets: ``[N, D]`` teacher targets of the views, or None (no teacher: no cosine metrics).
        batch_size: views per forward pass.
    """

    def __init__(self, objective: Any, samples: dict[str, Tensor], targets: Tensor | None, batch_size: int = 128):
        self.objective = objective
        self.images, self.masks = samples["image"], samples["mask"].bool()
        self.targets = targets
        self.batch_size = batch_size
        self.constants = {"mim_trivial_holdout": self._trivial_l1()}
        if targets is not None:
            unit = F.normalize(targets.float(), dim=-1)
            direction = unit.mean(0, keepdim=True)
            self.constants["cos_mean_vector_holdout"] = float(F.cosine_similarity(unit, direction).mean())
        self.start: dict[str, float] = {}
        self._start_pred: Tensor | None = None

    def _pixels(self, mask: Tensor) -> Tensor:
        p = self.objective.student.patch_size
        return mask.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1).unsqueeze(1)

    def _trivial_l1(self) -> float:
        total, n = 0.0, 0
        for s in range(0, len(self.images), self.batch_size):
            x, m = self.images[s : s + self.batch_size], self._pixels(self.masks[s : s + self.batch_size]).float()
            visible = 1 - m
            mean = (x * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
            total += float(masked_l1(mean.expand_as(x), x, m)) * len(x)
            n += len(x)
        return total / n

    @torch.no_grad()
    def _run(self, keep: int = 0) -> tuple[dict[str, float], Tensor | None]:
        obj = self.objective
        device = next(obj.parameters()).device
        was_training = obj.training
        obj.eval()
        l1_sum, cos_sum, kept = 0.0, 0.0, None
        try:
            for s in range(0, len(self.images), self.batch_size):
                x = self.images[s : s + self.batch_size].to(device)
                mask = self.masks[s : s + self.batch_size].to(device)
                feature, final_map = obj.student(x, mask)
                pred = obj.decoder(final_map).float()
                l1_sum += float(masked_l1(pred, x, self._pixels(mask))) * len(x)
                if self.targets is not None:
                    t = self.targets[s : s + self.batch_size].to(device)
                    cos_sum += float(F.cosine_similarity(obj.projector(feature).float(), t.float()).sum())
                if s == 0 and keep:
                    kept = pred[:keep].cpu()
        finally:
            obj.train(was_training)
        out = {"mim_holdout": l1_sum / len(self.images), **self.constants}
        if self.targets is not None:
            out["cos_holdout"] = cos_sum / len(self.images)
        return out, kept

    def begin(self) -> dict[str, float]:
        """Measure the weights as they are now (before training) and keep a few predictions."""
        self.start, self._start_pred = self._run(keep=PREVIEWS)
        return dict(self.start)

    def measure(self, step: int) -> dict[str, float]:
        """The held-out metrics now (merged into the step's logged record by :func:`~gfm_core.training.fit`)."""
        return self._run()[0]

    def save_reconstructions(self, path: str | Path) -> Path:
        """PNG grid, one row per view: input | masked | start prediction | end prediction | pasted (atomic)."""
        from gfm_core.evaluation.reconstructions import save_grid

        obj = self.objective
        _, end = self._run(keep=PREVIEWS)
        assert end is not None
        x, mask = self.images[: len(end)], self.masks[: len(end)]
        start = self._start_pred if self._start_pred is not None else torch.zeros_like(end)
        pix = self._pixels(mask).to(x.dtype)
        grey = torch.tensor([(0.5 - m) / s for m, s in zip(obj.mean, obj.std, strict=True)]).view(1, -1, 1, 1)
        return save_grid([x, x * (1 - pix) + grey * pix, start, end, x * (1 - pix) + end * pix], obj.mean, obj.std,
                         path)


def plot_learning(metrics_jsonl: str | Path, start: dict[str, float], path: str | Path) -> Path:
    """Training and held-out losses per logged step against the trivial references, as a PNG (atomic).

    Left: masked L1 (training batches, held-out views, visible-mean predictor). Right, with a teacher: cosine
    to the teacher (training, held-out, mean-vector baseline). ``start`` (the held-out values before training)
    is drawn at step 0.
    """
    import json

    from gfm_core.evaluation.figures import new_figure, write_png

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    panels = [("masked L1 (lower is better)", "mim", "mim_holdout", "mim_trivial_holdout", "visible mean colour")]
    if any("cos_holdout" in r for r in rows):
        panels.append(("cosine to the teacher (higher is better)", "cosine", "cos_holdout",
                       "cos_mean_vector_holdout", "mean teacher vector"))
    fig = new_figure(5.5 * len(panels), 3.6)
    for k, (title, train, held, ref, ref_label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.plot(steps, [r.get(train) for r in rows], label="training batches", color="#9aa", lw=1)
        held_x = ([0] if held in start else []) + steps
        held_y = ([start[held]] if held in start else []) + [r.get(held) for r in rows]
        ax.plot(held_x, held_y, label="held-out views", color="#c33", lw=2)
        if rows and ref in rows[-1]:
            ax.axhline(rows[-1][ref], color="#333", ls="--", lw=1, label=f"trivial: {ref_label}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return write_png(fig, path)
