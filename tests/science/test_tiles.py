"""Tile-level probes: block labels, pooled features, kNN and the majority row, on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from test_probes import _cfg, scenes  # noqa: F401  (the module fixture)

from gfm_core.science.probes import load_dense_set
from gfm_core.science.tiles import (
    block_labels,
    knn_predict,
    raw_tile_features,
    tile_cross_validate,
    tile_features,
)


def test_a_block_is_labelled_by_its_majority_class(scenes):  # noqa: F811
    ds = load_dense_set(_cfg(scenes), folds=3)  # 16 px cells (classes 0 1 / 2 3), 12 px blocks
    labels = block_labels(ds)
    where = {tuple(o): labels[k] for k, o in enumerate(ds.block_origin) if ds.block_image[k] == 0}
    assert where[(0, 0)] == 0  # wholly inside the first cell
    assert where[(12, 12)] == 3  # 16 px of class 0, 32 of 1, 32 of 2, 64 of 3
    assert where[(0, 12)] == 1  # 48 px of class 0, 96 of class 1


def test_tile_features_average_each_level_over_the_block(scenes):  # noqa: F811
    ds = load_dense_set(_cfg(scenes, block_size=24, margin=2), folds=2)
    f = tile_features(lambda x: [x, x[:, :1] * 2], ds, 12, (0.5,) * 3, (0.25,) * 3)
    assert f.shape == (len(ds.block_image), 4)
    (r0, c0), i = ds.block_origin[5], ds.block_image[5]
    block = ds.images[i][:, r0 : r0 + 24, c0 : c0 + 24]
    np.testing.assert_allclose(f[5, :3], (block.mean((1, 2)) - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_allclose(f[5, 3], 2 * f[5, 0], atol=1e-5)
    with pytest.raises(ValueError, match="not whole 16 px tiles"):
        tile_features(lambda x: [x], ds, 16, (0.5,) * 3, (0.25,) * 3)


def test_knn_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    y = rng.integers(0, 3, 60)
    x = centres[y] + rng.normal(size=(60, 8))
    assert (knn_predict(x[:40], y[:40], x[40:], 3) == y[40:]).all()


def test_colour_tiles_beat_the_majority_row_and_noise_does_not(scenes):  # noqa: F811
    ds = load_dense_set(_cfg(scenes), folds=3)
    labels = block_labels(ds)
    majority = tile_cross_validate(None, ds, labels, "majority")
    share = np.bincount(labels).max() / len(labels) * 100
    assert majority.confusion.sum() == len(labels) and majority.metric("pixel_accuracy") <= share + 1e-9
    raw = raw_tile_features(ds)
    assert raw.shape == (len(labels), 15)
    for probe in ("knn", "logistic"):
        acc = tile_cross_validate(raw, ds, labels, probe, iters=30).metric("pixel_accuracy")
        assert acc > majority.metric("pixel_accuracy") + 20, (probe, acc)
    noise = np.random.default_rng(1).normal(size=raw.shape).astype(np.float32)
    assert tile_cross_validate(noise, ds, labels, "knn").metric("pixel_accuracy") < share + 15
    with pytest.raises(ValueError, match="tile probe 'svm'"):
        tile_cross_validate(raw, ds, labels, "svm")
