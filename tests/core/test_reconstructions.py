"""The reconstruction preview: grid layout, masked patches greyed, prediction pasted only where masked."""

import numpy as np
import torch
from PIL import Image
from test_objectives import _batch, _objective, teacher_file  # noqa: F401 (fixture)

from gfm_core.evaluation.reconstructions import _to_rgb, reconstruction_grid, save_reconstructions


def test_grid_columns_show_input_masked_prediction_and_paste(teacher_file):  # noqa: F811
    obj = _objective(teacher_file).train()
    batch = _batch(b=2, size=64, patch=16)
    grid = reconstruction_grid(obj, batch["image"], batch["mask"])
    assert grid.shape == (2 * 64, 4 * 64, 3) and grid.dtype == np.uint8
    assert obj.training  # restored after the eval-mode pass

    x = batch["image"]
    with torch.no_grad():
        pred = obj.eval().reconstruct(x, batch["mask"])
    rgb_in, rgb_pred = _to_rgb(x, obj.mean, obj.std), _to_rgb(pred, obj.mean, obj.std)
    pix = batch["mask"].repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()  # student patch 4
    for i in range(2):
        row = grid[i * 64:(i + 1) * 64]
        inp, masked, prediction, pasted = (row[:, c * 64:(c + 1) * 64] for c in range(4))
        np.testing.assert_array_equal(inp, rgb_in[i])
        np.testing.assert_array_equal(prediction, rgb_pred[i])
        m = pix[i]
        assert m.any() and (~m).any()
        assert np.abs(masked[m].astype(int) - 128).max() <= 1  # grey where masked
        np.testing.assert_array_equal(masked[~m], rgb_in[i][~m])
        np.testing.assert_array_equal(pasted[~m], rgb_in[i][~m])
        assert np.abs(pasted[m].astype(int) - rgb_pred[i][m].astype(int)).max() <= 1


def test_png_is_written(teacher_file, tmp_path):  # noqa: F811
    obj = _objective(teacher_file)
    batch = _batch(b=3, size=64, patch=16)
    samples = [{"image": batch["image"][i], "mask": batch["mask"][i]} for i in range(3)]
    path = save_reconstructions(obj, samples, tmp_path / "out" / "reconstructions.png")
    with Image.open(path) as im:
        assert im.size == (4 * 64, 3 * 64) and im.mode == "RGB"
