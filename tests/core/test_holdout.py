"""Learning measured on held-out views: trivial references computed by hand, the probe, the preview grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_objectives import _batch, _objective, teacher_file  # noqa: F401 (fixture)

from gfm_core.evaluation.holdout import HoldoutProbe, plot_learning
from gfm_core.evaluation.reconstructions import to_rgb
from gfm_core.stages import learning_margins


def test_trivial_predictor_is_the_visible_mean_colour(teacher_file):  # noqa: F811
    obj = _objective(teacher_file)
    batch = _batch(b=3, size=64, patch=16)
    probe = HoldoutProbe(obj, batch, targets=None)
    x = batch["image"].double()
    pix = batch["mask"].repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).double()  # patch 4
    err, count = 0.0, 0.0
    for i in range(3):
        visible = x[i][:, pix[i, 0] == 0]  # [C, n_visible]
        mean = visible.mean(1).view(3, 1, 1)
        err += float(((x[i] - mean).abs() * pix[i]).sum())
        count += float(pix[i].sum()) * 3
    assert probe.constants["mim_trivial_holdout"] == pytest.approx(err / count, rel=1e-4)
    assert "cos_mean_vector_holdout" not in probe.constants


def test_mean_vector_baseline_is_the_best_constant_direction(teacher_file):  # noqa: F811
    obj = _objective(teacher_file)
    batch = _batch(b=4, size=64, patch=16)
    same = torch.tensor([[1.0, 2.0, 0.0]]).repeat(4, 1)
    assert HoldoutProbe(obj, batch, same).constants["cos_mean_vector_holdout"] == pytest.approx(1.0)
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    base = HoldoutProbe(obj, batch, t).constants["cos_mean_vector_holdout"]
    for _ in range(50):  # no other constant direction does better
        d = torch.randn(1, 3)
        assert float(F.cosine_similarity(t, d).mean()) <= base + 1e-6


def test_measure_equals_the_objective_on_the_views_and_restores_train_mode(teacher_file):  # noqa: F811
    obj = _objective(teacher_file).train()
    batch = _batch(b=3, size=64, patch=16)
    targets = obj.teacher_targets(batch["image"])
    probe = HoldoutProbe(obj, batch, targets, batch_size=2)  # two batches: 2 + 1 views
    got = probe.measure(0)
    assert obj.training
    with torch.no_grad():
        out = obj.eval()({**batch, "teacher_target": targets})
    obj.train()
    assert got["mim_holdout"] == pytest.approx(float(out["mim"]), rel=1e-4)
    assert got["cos_holdout"] == pytest.approx(float(out["cosine"]), rel=1e-4)
    assert set(learning_margins(got)) == {"mim_ratio_holdout", "cos_margin_holdout"}


def test_preview_grid_shows_start_and_end_predictions(teacher_file, tmp_path):  # noqa: F811
    obj = _objective(teacher_file)
    batch = _batch(b=4, size=64, patch=16)
    probe = HoldoutProbe(obj, batch, None)
    probe.begin()
    with torch.no_grad():
        for p in obj.decoder.parameters():
            p.add_(0.5)  # "training" changes the prediction
    path = probe.save_reconstructions(tmp_path / "r.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 * 64, 5 * 64, 3)
    x = batch["image"]
    rgb_in = to_rgb(x, obj.mean, obj.std)
    pix = batch["mask"].repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    for i in range(4):
        row = grid[i * 64:(i + 1) * 64]
        inp, masked, start, end, pasted = (row[:, c * 64:(c + 1) * 64] for c in range(5))
        m = pix[i]
        np.testing.assert_array_equal(inp, rgb_in[i])
        assert np.abs(masked[m].astype(int) - 128).max() <= 1
        np.testing.assert_array_equal(pasted[~m], rgb_in[i][~m])
        assert not np.array_equal(start, end)


def test_learning_plot_reads_the_logged_records(tmp_path):
    rows = [{"step": s, "mim": 1 - s / 100, "mim_holdout": 1 - s / 120, "mim_trivial_holdout": 0.7,
             "cosine": s / 100, "cos_holdout": s / 120, "cos_mean_vector_holdout": 0.5} for s in (10, 20, 30)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot_learning(log, {"mim_holdout": 1.0, "cos_holdout": 0.0}, tmp_path / "learning.png")
    with Image.open(path) as im:
        assert im.size[0] > 2 * im.size[1] * 0.9  # two panels side by side
