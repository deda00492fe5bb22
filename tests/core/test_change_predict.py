"""Change detection over whole scenes: ``predict_scene(before, after=...)``, a siamese model, ``gfm predict``."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from helpers.rasters import make_geotiff
from torch import nn

from gfm_core.errors import DataValidationError
from gfm_core.inference.bands import RGB, BandContract
from gfm_core.inference.predict import predict_scene

CONTRACT = BandContract(RGB, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), (3, 64, 64))
THRESHOLD = 0.5


class AbsDiff(nn.Module):
    """A siamese change model a test can compute by hand: class 1 where ``mean_c |after - before| > THRESHOLD``."""

    def forward(self, x):  # [B, 2, C, H, W] -> [B, 2, H, W]
        assert x.dim() == 5 and x.shape[1] == 2
        d = (x[:, 1] - x[:, 0]).abs().mean(1, keepdim=True)
        return torch.cat([THRESHOLD - d, d - THRESHOLD], dim=1)


def _pair(tmp_path, nodata=None):
    rng = np.random.default_rng(7)
    before = rng.integers(1, 255, (3, 150, 170), dtype=np.uint8)
    after = before.copy()
    after[:, 40:90, 60:140] = rng.integers(1, 255, (3, 50, 80), dtype=np.uint8)  # a new building
    if nodata is not None:
        after[:, 120:, :30] = nodata
    return (make_geotiff(tmp_path / "before.tif", data=before, nodata=nodata),
            make_geotiff(tmp_path / "after.tif", data=after, nodata=nodata), before, after)


def _normalised(a):
    return CONTRACT.normalise(a.astype(np.float32) / 255.0)


def test_change_map_is_the_pixelwise_decision_with_georeferencing_and_nodata_kept(tmp_path):
    b_path, a_path, before, after = _pair(tmp_path, nodata=0)
    res = predict_scene(b_path, AbsDiff(), CONTRACT, tmp_path / "change.tif", after=a_path, tile=64, overlap=16,
                        device="cpu")
    with rasterio.open(res.out) as out, rasterio.open(b_path) as src:
        pred, nodata = out.read(1), out.nodata
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, (150, 170))
    expected = (np.abs(_normalised(after) - _normalised(before)).mean(0) > THRESHOLD).astype(np.uint8)
    valid = np.ones((150, 170), bool)
    valid[120:, :30] = False  # nodata on the after date only
    assert res.output == "classes" and res.channels == 1 and nodata == 255
    assert (pred[~valid] == 255).all()
    np.testing.assert_array_equal(pred[valid], expected[valid])  # blending across tile borders changes nothing
    assert pred[40:90, 60:140].mean() > 0.9 and pred[valid & (np.arange(150)[:, None] < 40)].max() == 0


def test_scenes_on_different_grids_are_refused_by_name(tmp_path):
    b_path, _, before, _ = _pair(tmp_path)
    moved = make_geotiff(tmp_path / "moved.tif", data=before, origin=(500010.0, 4600000.0))
    with pytest.raises(DataValidationError, match=r"before.tif and .*moved.tif are not on the same grid \(transform"):
        predict_scene(b_path, AbsDiff(), CONTRACT, tmp_path / "c.tif", after=moved, device="cpu")
    smaller = make_geotiff(tmp_path / "small.tif", data=before[:, :100])
    with pytest.raises(DataValidationError, match="size 150 x 170 vs 100 x 170"):
        predict_scene(b_path, AbsDiff(), CONTRACT, tmp_path / "c.tif", after=smaller, device="cpu")
    assert not (tmp_path / "c.tif").exists()


def test_a_pair_needs_the_contract_bands_on_both_dates(tmp_path):
    b_path, _, before, _ = _pair(tmp_path)
    two = make_geotiff(tmp_path / "two.tif", data=before[:2])
    with pytest.raises(DataValidationError, match=r"two\.tif"):
        predict_scene(b_path, AbsDiff(), CONTRACT, tmp_path / "c.tif", after=two, device="cpu")


def test_gfm_predict_with_a_finetuned_change_run(tmp_path, tmp_path_factory, capsys):
    import yaml

    from gfm_core import cli
    from gfm_core.config import DemoDataCfg, load_params
    from gfm_core.data.tasks.dataset import TaskDataset
    from gfm_core.demo.build import build_demo_data
    from gfm_core.inference.finetuned import load_finetuned
    from gfm_core.stages.finetune import run_finetune_task

    root = tmp_path_factory.mktemp("demo")
    build_demo_data(DemoDataCfg(root=root))
    change = {"name": "change", "head": "change", "layout": "levircd", "root": str(root / "tasks" / "change"),
              "img_size": 32}
    tiny = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "finetune": {"tasks": [change], "models": [{"name": "imagenet", "kind": "random",
                                                    "arch": "swin_tiny_patch4_window7_224", "timm_kwargs": tiny}],
                     "seeds": [0], "batch_size": 8, "max_steps": 2, "decoder_dim": 8, "device": "cpu",
                     "num_workers": 0, "precision": "fp32", "out_dir": str(tmp_path / "ft")},
        "evaluate": {"models": ["imagenet"], "out_dir": str(tmp_path / "eval")},
        "pretrain": {"out_dir": str(tmp_path / "pre")},
    }))
    params = load_params(path)
    run = run_finetune_task(params, "change", "imagenet", 0).out_dir
    loaded, options = load_finetuned(run, params)
    assert options["pair"] and loaded.info["head"] == "change"
    ds = TaskDataset(params.task("change"), "test", mean=loaded.contract.mean, std=loaded.contract.std)
    ref = ds.refs[0].files
    out = tmp_path / "change.tif"
    argv = ["predict", str(ref["A"]), "--model", str(run), "--out", str(out), "--params", str(path), "--device", "cpu"]
    assert cli.main(argv) == 2 and "compares two dates: pass the after scene with --after" in capsys.readouterr().err
    assert cli.main([*argv, "--after", str(ref["B"])]) == 0
    assert f"classes: {out}" in capsys.readouterr().out
    with torch.no_grad():  # the dataset's own pair pipeline through the same model
        direct = loaded.model.eval()(ds[0]["image"][None])[0].argmax(0).numpy()
    with rasterio.open(out) as src:
        pred = src.read(1)
    assert pred.shape == direct.shape and (pred == direct).mean() > 0.99
