"""Tile-level probes (secondary): every block of a dense set is one scene-classification sample.

A block's label is the majority class of its labelled pixels; its feature is every level's map averaged over
the block (encoders) or each band's mean, standard deviation and 10/50/90th percentiles (raw pixels). Two
probes, each fitted on the blocks of the other folds (the dense probes' folds): k nearest neighbours (cosine on
standardised features, majority vote, summed similarity breaks ties) and the dense probes' logistic regression.
The trivial row predicts the training folds' majority class. Results are
:class:`~gfm_core.science.stats.BlockCounts` with one sample per block, so the dense probes' bootstrap applies
unchanged (its pixel accuracy is the tile accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gfm_core.science.probes import DenseSet, Encoder, cut_tiles, fit_predict
from gfm_core.science.stats import BlockCounts

PROBES = ("knn", "logistic")


def block_labels(ds: DenseSet) -> np.ndarray:
    """``[B]`` the majority class of each block's labelled pixels (ties: the lower class id)."""
    b = ds.block_size
    out = np.empty(len(ds.block_image), np.int64)
    for k, (i, (r0, c0)) in enumerate(zip(ds.block_image, ds.block_origin, strict=True)):
        lab = ds.labels[i][r0 : r0 + b, c0 : c0 + b]
        out[k] = int(np.bincount(lab[lab >= 0], minlength=ds.classes).argmax())
    return out


def _block(ds: DenseSet, k: int) -> np.ndarray:
    (r0, c0), b = ds.block_origin[k], ds.block_size
    return ds.images[ds.block_image[k]][:, r0 : r0 + b, c0 : c0 + b]


@torch.no_grad()
def tile_features(
    encoder: Encoder, ds: DenseSet, tile: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 32
) -> np.ndarray:
    """``[B, D]``: every level's map averaged over each block (a block of several tiles averages its tiles).

    Raises:
        ValueError: the block size is not a multiple of ``tile``.
    """
    if ds.block_size % tile:
        raise ValueError(f"set {ds.name!r}: blocks of {ds.block_size} px are not whole {tile} px tiles")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    per_block = (ds.block_size // tile) ** 2
    tiles = torch.cat([cut_tiles(_block(ds, k), tile)[0] for k in range(len(ds.block_image))])
    pooled = []
    for i in range(0, len(tiles), batch_size):
        maps = encoder((tiles[i : i + batch_size] - m) / s)
        pooled.append(torch.cat([f.float().mean((2, 3)) for f in maps], 1))
    feats = torch.cat(pooled).view(len(ds.block_image), per_block, -1).mean(1)
    return feats.numpy()


def raw_tile_features(ds: DenseSet) -> np.ndarray:
    """``[B, 5 C]``: each band's mean, standard deviation and 10/50/90th percentiles over the block."""
    out = []
    for k in range(len(ds.block_image)):
        x = _block(ds, k).reshape(ds.images[0].shape[0], -1)
        out.append(np.concatenate([x.mean(1), x.std(1), *np.percentile(x, (10, 50, 90), axis=1)]))
    return np.asarray(out, np.float32)


def knn_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, classes: int, k: int = 5,
                ) -> np.ndarray:
    """Majority vote of the ``k`` most cosine-similar training rows (standardised features)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6

    def unit(x: np.ndarray) -> np.ndarray:
        z = (x - mu) / sd
        return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)

    sim = unit(x_test) @ unit(x_train).T  # [test, train]
    k = min(k, len(y_train))
    near = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(x_test), classes))
    rows = np.repeat(np.arange(len(x_test)), k)
    np.add.at(votes, (rows, y_train[near].ravel()), 1.0 + 1e-6 * np.take_along_axis(sim, near, 1).ravel())
    return votes.argmax(1)


def tile_cross_validate(
    features: np.ndarray | None, ds: DenseSet, labels: np.ndarray, probe: str, *, k: int = 5,
    weight_decay: float = 1e-3, iters: int = 100,
) -> BlockCounts:
    """One-sample-per-block counts of out-of-fold predictions (``probe``: ``knn``, ``logistic`` or ``majority``).

    Raises:
        ValueError: an unknown probe.
    """
    if probe not in (*PROBES, "majority"):
        raise ValueError(f"tile probe {probe!r}: expected one of {(*PROBES, 'majority')}")
    pred = np.empty(len(labels), np.int64)
    for f in np.unique(ds.block_fold):
        test = ds.block_fold == f
        y = labels[~test]
        if probe == "majority" or features is None:
            pred[test] = int(np.bincount(y, minlength=ds.classes).argmax())
        elif probe == "knn":
            pred[test] = knn_predict(features[~test], y, features[test], ds.classes, k)
        else:
            pred[test] = fit_predict(features[~test], y, features[test], ds.classes, weight_decay, iters)
    confusion = np.zeros((len(labels), ds.classes, ds.classes), np.int64)
    confusion[np.arange(len(labels)), labels, pred] = 1
    return BlockCounts(ds.block_image.copy(), confusion)
