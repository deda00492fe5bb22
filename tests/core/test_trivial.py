"""Trivial predictors: fitted on train only, scored on test like a fine-tuned model, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_finetune import _task, demo_tasks  # noqa: F401 (fixture)

from gfm_core.data.tasks.dataset import TaskDataset
from gfm_core.evaluation.trivial import TRIVIAL, trivial_scores


def _split(task, split):
    return TaskDataset(task, split, mean=(0.0,) * 3, std=(1.0,) * 3)


def test_majority_class_scores_the_test_share_of_the_train_majority(demo_tasks):  # noqa: F811
    task = _task(demo_tasks, "classification")
    runs = trivial_scores(task, seeds=[0, 1])
    assert [r.seed for r in runs] == [0, 1] and runs[0].model == TRIVIAL and runs[0].metrics == runs[1].metrics
    train = [int(_split(task, "train")[i]["label"]) for i in range(len(_split(task, "train")))]
    test = [int(_split(task, "test")[i]["label"]) for i in range(len(_split(task, "test")))]
    major = np.bincount(train).argmax()
    assert runs[0].metrics["acc"] == pytest.approx(100 * np.mean(np.array(test) == major), abs=1e-4)
    assert runs[0].ids == [r.id for r in _split(task, "test").refs]


def test_bicubic_super_resolution(demo_tasks):  # noqa: F811
    task = _task(demo_tasks, "superres")
    psnr = trivial_scores(task, seeds=[0])[0].metrics["PSNR"]
    ds = _split(task, "test")
    vals = []
    for i in range(len(ds)):
        s = ds[i]
        up = F.interpolate(s["image"][None], size=s["target"].shape[-2:], mode="bicubic").clamp(0, 1)
        vals.append(float(10 * torch.log10(1 / ((up[0] - s["target"]) ** 2).mean())))
    assert psnr == pytest.approx(np.mean(vals), abs=1e-3)


def test_the_change_rule_does_not_solve_the_semi_synthetic_pairs(demo_tasks):  # noqa: F811
    f1 = trivial_scores(_task(demo_tasks, "change"), seeds=[0])[0].metrics["F1"]
    assert 5 < f1 < 80  # a second acquisition's radiometry and misregistration: |A - B| is no longer the label
