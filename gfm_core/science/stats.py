"""Statistics of the science experiment, fixed before it runs: paired hierarchical bootstrap, Holm, verdicts.

A comparison ``A - B`` is paired at every level: both models are scored on the same pixels of the same spatial
blocks of the same images, and model ``A`` of pretraining seed ``s`` is compared with model ``B`` of the same
seed (same initialisation, crops and masks). One bootstrap replicate resamples, with replacement and the same
draw for every model:

1. the pretraining seeds;
2. the images of the evaluation set (when it has several; FLAIR-2's five);
3. the spatial blocks within each drawn image.

The replicate's difference is the mean over the drawn seeds of ``metric(A_s) - metric(B_s)`` on the drawn blocks,
where the metric (pixel accuracy, mIoU) is recomputed from the blocks' pooled counts. The 95 % interval is the
percentile interval; the two-sided p-value is ``2 min(P(diff <= d0), P(diff >= d0))`` over replicates (with the
usual +1 correction) for the null difference ``d0`` (0, or ``-margin`` for a non-inferiority question); Holm's
step-down adjustment runs over every test of the family. A verdict is ``supported`` (adjusted p < alpha, diff >
d0), ``contradicted`` (adjusted p < alpha, diff < d0) or ``inconclusive``; a hypothesis that the relevance rule
excludes is ``untestable`` and is not part of the family. The minimal detectable difference is
``(z_{1-alpha/2} + z_{0.8}) x`` the bootstrap standard error (80 % power).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

METRICS = ("pixel_accuracy", "miou")
Z_POWER = 2.8016  # z_{0.975} + z_{0.80}


@dataclass(frozen=True)
class BlockCounts:
    """Per-block confusion counts of one model on one evaluation set.

    Attributes:
        image: ``[B]`` image index of each block.
        confusion: ``[B, K, K]`` counts (true class, predicted class) of the block's scored pixels.
    """

    image: np.ndarray
    confusion: np.ndarray

    def metric(self, name: str, weights: np.ndarray | None = None) -> float:
        """``name`` (``pixel_accuracy`` or ``miou``, in points) of the blocks, each counted ``weights`` times."""
        cm = np.tensordot(weights, self.confusion, axes=1) if weights is not None else self.confusion.sum(0)
        return confusion_metric(cm, name)


def confusion_metric(cm: np.ndarray, name: str) -> float:
    """Pixel accuracy or mean IoU (over classes present in truth or prediction), in points, of a ``[K, K]``."""
    total = cm.sum()
    if total == 0:
        return float("nan")
    if name == "pixel_accuracy":
        return 100.0 * float(np.trace(cm)) / float(total)
    if name == "miou":
        tp = np.diag(cm).astype(np.float64)
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        return 100.0 * float((tp[present] / union[present]).mean())
    raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")


@dataclass(frozen=True)
class Comparison:
    """One paired comparison ``A - B`` on one evaluation set and metric.

    Attributes:
        diff: the point estimate (mean over seeds of the full-data differences), in points.
        ci: the percentile interval of the bootstrap differences.
        se: the bootstrap standard error.
        p_two_sided: two-sided bootstrap p-value of ``diff = 0``.
        per_seed: the full-data difference of every seed.
        mdd: the minimal detectable difference of this design (80 % power, two-sided ``alpha``).
    """

    diff: float
    ci: tuple[float, float]
    se: float
    p_two_sided: float
    per_seed: tuple[float, ...]
    mdd: float

    def seeds_agree(self) -> str:
        """How many seeds share the sign of the estimate, e.g. ``"4/4"``."""
        sign = np.sign(self.diff)
        return f"{int(sum(np.sign(d) == sign and d != 0 for d in self.per_seed))}/{len(self.per_seed)}"


def confusion_metrics(cms: np.ndarray, name: str) -> np.ndarray:
    """:func:`confusion_metric` of each ``[K, K]`` of a ``[R, K, K]`` stack (vectorised)."""
    total = cms.sum((1, 2)).astype(np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2).astype(np.float64)
    if name == "pixel_accuracy":
        return 100.0 * tp.sum(1) / np.maximum(total, 1)
    if name == "miou":
        union = cms.sum(1) + cms.sum(2) - tp
        present = union > 0
        iou = np.where(present, tp / np.maximum(union, 1), 0.0)
        return 100.0 * iou.sum(1) / np.maximum(present.sum(1), 1)
    raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")


@dataclass(frozen=True)
class Replicates:
    """The bootstrap draws of one evaluation set, shared by every comparison on it (common random numbers).

    Attributes:
        seeds: ``[R, S]`` drawn seed positions of each replicate.
        weights: ``[R, B]`` multiplicity of each block in each replicate.
    """

    seeds: np.ndarray
    weights: np.ndarray

    @classmethod
    def draw(cls, image_of_block: np.ndarray, n_seeds: int, n_boot: int, seed: int = 0) -> Replicates:
        """Seeds with replacement; images with replacement (when several); blocks within each drawn image."""
        rng = np.random.default_rng(seed)
        images = np.unique(image_of_block)
        members = [np.flatnonzero(image_of_block == i) for i in images]
        weights = np.zeros((n_boot, len(image_of_block)))
        for r in range(n_boot):
            drawn = rng.integers(0, len(images), size=len(images)) if len(images) > 1 else [0]
            for k in drawn:
                np.add.at(weights[r], rng.choice(members[k], size=len(members[k]), replace=True), 1.0)
        return cls(rng.integers(0, n_seeds, size=(n_boot, n_seeds)), weights)


def paired_bootstrap(
    a: Sequence[BlockCounts],
    b: Sequence[BlockCounts],
    metric: str,
    reps: Replicates,
    *,
    ci: float = 0.95,
    null: float = 0.0,
) -> Comparison:
    """Compare ``a[s]`` with ``b[s]`` (seed ``s`` of each) over the replicates ``reps`` (module docstring).

    Both lists hold one :class:`BlockCounts` per seed, all over the same blocks; a model with no seeds of its
    own (raw pixels, the teacher) is passed as the same counts repeated. ``null`` is the difference the p-value
    tests against (0; ``-margin`` for a non-inferiority question).

    Raises:
        ValueError: different seed counts or blocks.
    """
    if len(a) != len(b) or not a or reps.seeds.shape[1] != len(a):
        raise ValueError(f"paired_bootstrap: {len(a)} vs {len(b)} seeds, replicates drawn for {reps.seeds.shape[1]}")
    image = a[0].image
    for c in (*a, *b):
        if not np.array_equal(c.image, image):
            raise ValueError("paired_bootstrap: the models were scored on different blocks")
    per_seed = tuple(x.metric(metric) - y.metric(metric) for x, y in zip(a, b, strict=True))
    diffs = np.stack([  # [S, R]: seed s's difference on each replicate's blocks
        confusion_metrics(np.einsum("rb,bij->rij", reps.weights, x.confusion), metric)
        - confusion_metrics(np.einsum("rb,bij->rij", reps.weights, y.confusion), metric)
        for x, y in zip(a, b, strict=True)
    ])
    boot = diffs[reps.seeds, np.arange(len(reps.seeds))[:, None]].mean(1)
    lo, hi = np.percentile(boot, [50 * (1 - ci), 100 - 50 * (1 - ci)])
    le, ge = int(np.sum(boot <= null)), int(np.sum(boot >= null))
    p = min(1.0, 2 * (min(le, ge) + 1) / (len(boot) + 1))
    se = float(np.std(boot, ddof=1))
    return Comparison(float(np.mean(per_seed)), (float(lo), float(hi)), se, p, per_seed, Z_POWER * se)


K = TypeVar("K", bound=Hashable)


def holm(p_values: Mapping[K, float]) -> dict[K, float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1) of a family of tests."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def verdict(diff: float, p_adjusted: float, alpha: float = 0.05, null: float = 0.0) -> str:
    """``supported`` / ``contradicted`` (significantly above / below ``null`` after adjustment) or ``inconclusive``."""
    if p_adjusted < alpha:
        return "supported" if diff > null else "contradicted"
    return "inconclusive"
