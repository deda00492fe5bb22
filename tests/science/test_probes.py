"""Dense probes: reading a labelled set, features at the scored pixels, block and image-disjoint CV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.rasters import make_geotiff
from test_experiment import _labelled_scene

from gfm_core.config import EvalSetCfg
from gfm_core.errors import DataValidationError
from gfm_core.science.probes import (
    cross_validate,
    encoder_features,
    load_dense_set,
    raw_features,
    with_image_identity,
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    for i in range(3):
        _labelled_scene(root / "train" / "images" / f"s{i}.tif", root / "train" / "masks" / f"s{i}.tif", i, size=72)
    return root


def _cfg(root, **kw):
    base = dict(name="q", root=root, splits=["train"], mask_values=[1, 2, 3, 4], block_size=12, margin=2,
                pixels_per_block=20, stretch=None)
    return EvalSetCfg(**{**base, **kw})


def test_blocks_pixels_and_folds(scenes):
    ds = load_dense_set(_cfg(scenes), folds=5, seed=0)
    assert len(ds.images) == 3 and ds.images[0].shape == (3, 72, 72) and ds.classes == 4
    assert len(ds.block_image) == 3 * 36 and len(ds.px_label) == 3 * 36 * 20
    assert np.bincount(ds.block_fold).tolist() == [22, 22, 22, 21, 21]  # balanced folds of whole blocks
    for b in range(len(ds.block_image)):  # a block's pixels lie inside it, away from its edges
        rows, cols = ds.px_row[ds.px_block == b], ds.px_col[ds.px_block == b]
        assert rows.max() - rows.min() < 12 - 4 and cols.max() - cols.min() < 12 - 4
        assert set(rows % 12) <= set(range(2, 10)) and set(cols % 12) <= set(range(2, 10))
    lab = ds.labels[1]
    assert np.array_equal(ds.px_label[ds.px_image == 1], lab[ds.px_row[ds.px_image == 1], ds.px_col[ds.px_image == 1]])
    again = load_dense_set(_cfg(scenes), folds=5, seed=0)
    assert np.array_equal(again.px_row, ds.px_row) and np.array_equal(again.block_fold, ds.block_fold)


def test_downsampling_averages_pixels_and_takes_majority_labels(scenes):
    full = load_dense_set(_cfg(scenes), folds=2)
    half = load_dense_set(_cfg(scenes, downsample=2, block_size=6, margin=1), folds=2)
    assert half.images[0].shape == (3, 36, 36)
    np.testing.assert_allclose(half.images[0], full.images[0].reshape(3, 36, 2, 36, 2).mean((2, 4)), atol=1e-6)
    assert np.array_equal(half.labels[0], full.labels[0][::2, ::2])  # quadrants: every 2x2 block is pure


def test_features_are_each_levels_map_at_the_pixel_centre(scenes):
    ds = load_dense_set(_cfg(scenes), folds=2)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def identity(x):  # full resolution and a 2x coarser level
        return [x, torch.nn.functional.avg_pool2d(x, 2)]

    f = encoder_features(identity, ds, 32, mean, std)  # 72 px: tiles of 32 with a reflected border
    assert f.shape == (len(ds.px_label), 6)
    px = zip(ds.px_image, ds.px_row, ds.px_col, strict=True)
    want = (np.stack([ds.images[i][:, r, c] for i, r, c in px]) - 0.5) / 0.25
    np.testing.assert_allclose(f[:, :3], want, atol=1e-5)


def test_probes_learn_colour_classes_and_image_disjoint_cv(scenes):
    ds = load_dense_set(_cfg(scenes), folds=3)
    raw = raw_features(ds)
    assert raw.shape == (len(ds.px_label), 15)
    counts = cross_validate(raw, ds, iters=30)
    assert counts.confusion.sum() == len(ds.px_label) and counts.metric("pixel_accuracy") > 95
    loio = cross_validate(raw, ds, by="images", iters=30)
    assert loio.metric("pixel_accuracy") > 90  # the colours are the same in every scene
    noise = np.random.default_rng(0).normal(size=raw.shape).astype(np.float32)
    assert cross_validate(noise, ds, iters=30).metric("pixel_accuracy") < 40  # 4 classes: chance is 25
    ident = with_image_identity(noise, ds)
    assert ident.shape[1] == noise.shape[1] + 3 and set(np.unique(ident[:, -3:])) == {0.0, 1.0}


def test_missing_masks_and_too_few_blocks_are_named(tmp_path, scenes):
    make_geotiff(tmp_path / "images" / "a.tif", size=20)
    with pytest.raises(DataValidationError, match=r"a\.tif: expected one mask .* found none"):
        load_dense_set(_cfg(tmp_path, splits=[]), folds=2)
    with pytest.raises(DataValidationError, match="fewer than 5 folds"):
        load_dense_set(_cfg(scenes, block_size=72), folds=5)
    with pytest.raises(DataValidationError, match=r"no pixel of its masks holds one of mask_values \[7, 8\]"):
        load_dense_set(_cfg(scenes, mask_values=[7, 8]), folds=2)
