"""The science statistics against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from gfm_core.science.stats import (
    BlockCounts,
    Replicates,
    confusion_metric,
    confusion_metrics,
    holm,
    paired_bootstrap,
    verdict,
)


def _model(rng, acc, blocks=60, pixels=50, images=3, k=4):
    """Block counts of a model that is right with probability ``acc`` on every pixel."""
    image = np.repeat(np.arange(images), blocks // images)
    cm = np.zeros((blocks, k, k), np.int64)
    for b in range(blocks):
        truth = rng.integers(0, k, pixels)
        right = rng.random(pixels) < acc
        pred = np.where(right, truth, (truth + 1 + rng.integers(0, k - 1, pixels)) % k)
        np.add.at(cm[b], (truth, pred), 1)
    return BlockCounts(image, cm)


def test_metrics_by_hand():
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    assert confusion_metric(cm, "pixel_accuracy") == pytest.approx(100 * 11 / 14)
    iou = [8 / (10 + 9 - 8), 3 / (4 + 5 - 3)]  # class 2 absent from truth and prediction: not averaged
    assert confusion_metric(cm, "miou") == pytest.approx(100 * np.mean(iou))
    np.testing.assert_allclose(confusion_metrics(np.stack([cm, 2 * cm]), "miou"), [100 * np.mean(iou)] * 2)
    with pytest.raises(ValueError, match="unknown metric"):
        confusion_metric(cm, "f1")


def test_identical_models_give_an_interval_around_zero_and_no_verdict():
    rng = np.random.default_rng(0)
    seeds = [_model(rng, 0.7) for _ in range(3)]
    reps = Replicates.draw(seeds[0].image, 3, 500, seed=1)
    c = paired_bootstrap(seeds, seeds, "pixel_accuracy", reps)
    assert c.diff == 0 and c.ci == (0.0, 0.0) and c.p_two_sided == 1.0
    other = [_model(rng, 0.7) for _ in range(3)]  # same quality, other draws
    c = paired_bootstrap(seeds, other, "pixel_accuracy", reps)
    assert c.ci[0] < 0 < c.ci[1] and c.p_two_sided > 0.05
    assert verdict(c.diff, holm({"x": c.p_two_sided})["x"]) == "inconclusive"


def test_a_planted_difference_is_detected_with_the_right_sign_and_size():
    rng = np.random.default_rng(1)
    better = [_model(rng, 0.75) for _ in range(4)]
    worse = [_model(rng, 0.65) for _ in range(4)]
    reps = Replicates.draw(better[0].image, 4, 1000, seed=2)
    c = paired_bootstrap(better, worse, "pixel_accuracy", reps)
    assert 7 < c.diff < 13 and c.ci[0] > 0 and c.p_two_sided < 0.01
    assert c.seeds_agree() == "4/4" and 0 < c.mdd < 10
    assert verdict(c.diff, c.p_two_sided) == "supported"
    flipped = paired_bootstrap(worse, better, "pixel_accuracy", reps)
    assert flipped.diff == pytest.approx(-c.diff) and verdict(flipped.diff, flipped.p_two_sided) == "contradicted"


def test_replicates_resample_images_then_blocks_and_seeds():
    image = np.repeat(np.arange(5), 10)
    reps = Replicates.draw(image, n_seeds=3, n_boot=200, seed=0)
    assert reps.weights.shape == (200, 50) and reps.seeds.shape == (200, 3)
    assert np.all(reps.weights.sum(1) % 10 == 0)  # whole images of 10 blocks each are drawn
    per_image = reps.weights.reshape(200, 5, 10).sum(2) / 10
    assert (per_image == 0).any() and (per_image >= 2).any()  # some images left out, some drawn twice
    one = Replicates.draw(np.zeros(40, int), 2, 100, seed=0)
    assert np.all(one.weights.sum(1) == 40)  # a single image: blocks only


def test_holm_step_down():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adj == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.5})  # 4x, 3x, max(2x, prev), 1x
    assert holm({}) == {}


def test_paired_bootstrap_refuses_other_blocks():
    rng = np.random.default_rng(3)
    a, b = _model(rng, 0.7), _model(rng, 0.7, blocks=30)
    with pytest.raises(ValueError, match="different blocks"):
        paired_bootstrap([a], [b], "miou", Replicates.draw(a.image, 1, 10))
