"""Tiled inference on whole scenes: tiling plan, blending, band contract, predict to GeoTIFF, embed to GeoParquet."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from affine import Affine
from helpers.registry import tiny_backbone
from torch import nn

from gfm_core.errors import CheckpointError, DataValidationError
from gfm_core.inference.bands import RGB, BandContract
from gfm_core.inference.embed import embed_scene
from gfm_core.inference.geoparquet import parse_polygon_wkb
from gfm_core.inference.predict import predict_scene
from gfm_core.inference.source import load_exported, load_model
from gfm_core.inference.tiles import blend_weight, plan_tiles

CRS = "EPSG:32617"
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
CONTRACT = BandContract(RGB, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), (3, 64, 64))


def write_scene(path, array, *, nodata=None, descriptions=None, transform=TRANSFORM):
    c, h, w = array.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=array.dtype, crs=CRS,
                       transform=transform, nodata=nodata) as dst:
        dst.write(array)
        if descriptions:
            dst.descriptions = tuple(descriptions)
    return path


def random_scene(path, bands=3, h=150, w=170, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return write_scene(path, rng.integers(1, 255, (bands, h, w), dtype=np.uint8), **kw)


def normalised(array, contract=CONTRACT):
    return contract.normalise(array.astype(np.float32) / 255.0)


def read(path):
    with rasterio.open(path) as src:
        return src.read(), src.crs, src.transform, src.nodata


def test_plan_covers_the_scene_inside_its_edges():
    plan = plan_tiles(150, 170, 64, 16)
    cover = np.zeros((150, 170), int)
    for t in plan:
        assert 0 <= t.y and t.y + t.h <= 150 and 0 <= t.x and t.x + t.w <= 170
        cover[t.y:t.y + t.h, t.x:t.x + t.w] += 1
    assert cover.min() >= 1
    assert plan.ys[-1] == 150 - 64 and plan.xs[-1] == 170 - 64  # last windows shifted back, not padded
    w = blend_weight(64, 64, 16)
    assert w.min() > 0 and w[32, 32] == 1.0


def test_predict_keeps_georeferencing_and_blends_exactly(tmp_path):
    scene = random_scene(tmp_path / "s.tif")
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)  # per-pixel linear: tiled output must equal the whole-scene output
    res = predict_scene(scene, model, CONTRACT, tmp_path / "out.tif", tile=64, overlap=16, output="values",
                        device="cpu")
    out, crs, transform, _ = read(res.out)
    assert out.shape == (4, 150, 170) and res.tiles == 12
    assert crs.to_string() == CRS and transform == TRANSFORM
    src, _, _, _ = read(scene)
    with torch.no_grad():
        full = model(torch.from_numpy(normalised(src))[None])[0].numpy()
    np.testing.assert_allclose(out, full, atol=1e-5)


def test_scene_smaller_than_a_tile_is_padded_and_cropped(tmp_path):
    scene = random_scene(tmp_path / "small.tif", h=40, w=50)
    torch.manual_seed(3)
    model = nn.Conv2d(3, 2, 1)
    res = predict_scene(scene, model, CONTRACT, tmp_path / "out.tif", tile=64, output="values", device="cpu")
    out, _, transform, _ = read(res.out)
    src, _, _, _ = read(scene)
    with torch.no_grad():
        full = model(torch.from_numpy(normalised(src))[None])[0].numpy()
    assert out.shape == (2, 40, 50) and transform == TRANSFORM
    np.testing.assert_allclose(out, full, atol=1e-5)


def test_constant_scene_gives_constant_output_across_tile_borders(tmp_path):
    scene = write_scene(tmp_path / "c.tif", np.full((3, 150, 170), 100, np.uint8))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    res = predict_scene(scene, model, CONTRACT, tmp_path / "out.tif", tile=64, overlap=16, output="probabilities",
                        device="cpu")
    out, _, _, _ = read(res.out)
    x = torch.from_numpy(normalised(np.full((3, 1, 1), 100, np.uint8)))[None]
    with torch.no_grad():
        expected = model(x).softmax(1)[0, :, 0, 0].numpy()
    assert np.abs(out - expected[:, None, None]).max() < 1e-5


def test_class_map_is_uint8_argmax_with_nodata_preserved(tmp_path):
    array = np.random.default_rng(2).integers(1, 255, (3, 150, 170), dtype=np.uint8)
    array[:, :70, :80] = 0  # a nodata block covering whole tiles and parts of others
    scene = write_scene(tmp_path / "n.tif", array, nodata=0)
    torch.manual_seed(2)
    model = nn.Conv2d(3, 3, 1)
    res = predict_scene(scene, model, CONTRACT, tmp_path / "out.tif", tile=64, overlap=16, device="cpu")
    out, _, _, nodata = read(res.out)
    assert out.dtype == np.uint8 and out.shape == (1, 150, 170) and nodata == 255
    assert res.skipped == 1  # the tile at (0, 0) is all nodata
    assert (out[0, :70, :80] == 255).all() and (out[0, 70:, :] < 3).all() and (out[0, :, 80:] < 3).all()
    with torch.no_grad():
        full = model(torch.from_numpy(normalised(array))[None])[0].numpy().argmax(0)
    assert (out[0, 70:] == full[70:]).mean() > 0.999  # argmax of blended softmax = argmax of the pixel's logits


def test_superres_scales_the_transform(tmp_path):
    scene = random_scene(tmp_path / "s.tif", h=100, w=90)
    model = nn.Upsample(scale_factor=2, mode="nearest")
    res = predict_scene(scene, model, CONTRACT, tmp_path / "sr.tif", tile=64, overlap=16, scale=2, output="values",
                        device="cpu")
    out, crs, transform, _ = read(res.out)
    assert out.shape == (3, 200, 180) and crs.to_string() == CRS
    assert transform == TRANSFORM @ Affine.scale(0.5)
    src, _, _, _ = read(scene)
    np.testing.assert_allclose(out[:, ::2, ::2], normalised(src), atol=1e-5)


def test_band_contract_names_expected_and_found_bands(tmp_path):
    scene = random_scene(tmp_path / "four.tif", bands=4)
    with pytest.raises(DataValidationError, match=r"expects bands \(3: red, green, blue\).*has \(4: band1"):
        predict_scene(scene, nn.Conv2d(3, 2, 1), CONTRACT, tmp_path / "o.tif", tile=64, device="cpu")
    assert not (tmp_path / "o.tif").exists()


def test_band_selection_by_name_and_index(tmp_path):
    array = np.random.default_rng(3).integers(1, 255, (4, 70, 70), dtype=np.uint8)
    named = write_scene(tmp_path / "nrgb.tif", array, descriptions=("nir", "B04", "green", "blue"))
    plain = write_scene(tmp_path / "plain.tif", array)
    model = nn.Conv2d(3, 3, 1)
    kw = {"tile": 64, "overlap": 16, "output": "values", "device": "cpu"}
    auto = predict_scene(named, model, CONTRACT, tmp_path / "a.tif", **kw)  # descriptions resolve red/green/blue
    by_name = predict_scene(plain, model, CONTRACT, tmp_path / "b.tif", **kw, bands=(2, 3, 4))
    assert np.array_equal(read(auto.out)[0], read(by_name.out)[0])
    with pytest.raises(DataValidationError, match="not found"):
        predict_scene(named, model, CONTRACT, tmp_path / "c.tif", **kw, band_names=("red", "green", "yellow"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bb")
    path, _ = tiny_backbone(folder, 0, {"teacher": {"sha256": "ab" * 32, "arch": "tiny-teacher"}})
    return path


def test_embed_rows_geometry_vectors_and_metadata(tmp_path, backbone):
    loaded = load_exported(backbone)
    scene = random_scene(tmp_path / "s.tif")
    res = embed_scene(scene, loaded.model, loaded.contract, tmp_path / "e.parquet", batch_size=5, device="cpu",
                      info=loaded.info)
    table = pq.read_table(res.out)
    assert table.num_rows == res.tiles == 9 and res.skipped == 0  # 3 x 3 grid of 64 px over 150 x 170
    meta = table.schema.metadata
    geo, gfm = json.loads(meta[b"geo"]), json.loads(meta[b"gfm"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"]["id"]["code"] == 32617
    assert gfm["weights_sha256"] == loaded.info["weights_sha256"] and gfm["teacher_sha256"] == "ab" * 32
    minx, maxy = TRANSFORM.c, TRANSFORM.f
    maxx, miny = minx + 170 * 10, maxy - 150 * 10
    src, _, _, _ = read(scene)
    model = loaded.model.eval()
    for row in table.to_pylist():
        ring = parse_polygon_wkb(row["geometry"])
        assert all(minx <= px <= maxx and miny <= py <= maxy for px, py in ring)
        t = src[:, row["y"]:row["y"] + 64, row["x"]:row["x"] + 64]
        with torch.no_grad():
            direct = model(torch.from_numpy(normalised(t, loaded.contract))[None])[0].numpy()
        np.testing.assert_allclose(row["embedding"], direct, atol=1e-4)
    assert geo["columns"]["geometry"]["bbox"] == [minx, miny, maxx, maxy]


def test_embed_skips_nodata_tiles(tmp_path, backbone):
    loaded = load_exported(backbone)
    array = np.random.default_rng(4).integers(1, 255, (3, 128, 192), dtype=np.uint8)
    array[:, :64, :64] = 0
    array[:, 64:, 100:] = 0
    scene = write_scene(tmp_path / "n.tif", array, nodata=0)
    res = embed_scene(scene, loaded.model, loaded.contract, tmp_path / "e.parquet", device="cpu",
                      raster=tmp_path / "e.tif")
    table = pq.read_table(res.out)
    assert res.skipped == 2 and table.num_rows == 4  # (0,0) and (1,2) are all nodata
    grid, crs, transform, _ = read(res.raster)  # one pixel per tile, one band per feature
    assert grid.shape == (res.dim, 2, 3) and crs.to_string() == CRS and transform == TRANSFORM @ Affine.scale(64)
    assert np.isnan(grid[:, 0, 0]).all() and np.isnan(grid[:, 1, 2]).all()
    for row in table.to_pylist():
        np.testing.assert_array_equal(grid[:, row["row"], row["col"]], np.float32(row["embedding"]))
    fractions = dict(zip(zip(table["row"].to_pylist(), table["col"].to_pylist(), strict=True),
                         table["valid_fraction"].to_pylist(), strict=True))
    assert (0, 0) not in fractions and (1, 2) not in fractions
    assert fractions[(1, 1)] == pytest.approx(36 / 64) and fractions[(0, 1)] == 1.0


def test_embed_from_the_registry_champion(store, backbone):
    import mlflow

    from gfm_core import tracking

    with tracking.stage_run("promote", {"seed": 1}):
        version = tracking.register_backbone(backbone, "gfm-foundation", {})
    with pytest.raises(CheckpointError, match="without a champion use models:/<name>/latest"):
        load_model("models:/gfm-foundation@champion")
    assert load_model("models:/gfm-foundation/latest").info["model_version"] == version
    mlflow.MlflowClient().set_registered_model_alias("gfm-foundation", "champion", version)
    loaded = load_model("models:/gfm-foundation@champion")
    assert loaded.info["model_version"] == version
    scene = random_scene(store / "s.tif", h=64, w=64)
    res = embed_scene(scene, loaded.model, loaded.contract, store / "e.parquet", device="cpu", info=loaded.info)
    gfm = json.loads(pq.read_schema(res.out).metadata[b"gfm"])
    assert gfm["model_uri"] == "models:/gfm-foundation@champion" and gfm["model_version"] == version


def test_predict_with_a_finetuned_segmentation_run(tmp_path, tmp_path_factory):
    from gfm_core.config import DemoDataCfg, parse_params
    from gfm_core.data.tasks.dataset import TaskDataset
    from gfm_core.demo.build import build_demo_data
    from gfm_core.inference.finetuned import load_finetuned
    from gfm_core.stages.finetune import run_finetune_task

    root = tmp_path_factory.mktemp("demo")
    build_demo_data(DemoDataCfg(root=root))
    seg = {"name": "segmentation", "head": "segmentation", "layout": "folders", "root": str(root / "tasks" /
           "segmentation"), "img_size": 32, "bands": [3, 2, 1], "value_range": [0, 255],
           "mask_values": [1, 2, 3, 4, 5, 6, 7]}
    tiny = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}
    params = parse_params({
        "finetune": {"tasks": [seg], "models": [{"name": "imagenet", "kind": "random",
                                                 "arch": "swin_tiny_patch4_window7_224", "timm_kwargs": tiny}],
                     "seeds": [0], "batch_size": 16, "max_steps": 2, "decoder_dim": 8, "device": "cpu",
                     "num_workers": 0, "precision": "fp32", "out_dir": str(tmp_path / "ft")},
        "evaluate": {"models": ["imagenet"], "out_dir": str(tmp_path / "eval")},
        "pretrain": {"out_dir": str(tmp_path / "pre")},
    })
    res = run_finetune_task(params, "segmentation", "imagenet", 0)
    loaded, options = load_finetuned(res.out_dir, params)
    assert options["bands"] == (3, 2, 1) and options["output"] == "classes"
    ds = TaskDataset(params.task("segmentation"), "test", mean=loaded.contract.mean, std=loaded.contract.std)
    image = next(iter(ds.refs[0].files.values()))
    out = predict_scene(image, loaded.model, loaded.contract, tmp_path / "map.tif", device="cpu",
                        bands=options["bands"], value_range=options["value_range"])
    with torch.no_grad():  # the dataset's own pipeline (bands, scaling, normalisation) through the same model
        direct = loaded.model.eval()(ds[0]["image"][None])[0].argmax(0).numpy()
    pred, _, _, _ = read(out.out)
    assert pred.shape[1:] == direct.shape and (pred[0] == direct).mean() > 0.99


def test_cli_embed_from_an_exported_backbone(tmp_path, backbone, capsys, repo_root):
    from gfm_core import cli

    scene = random_scene(tmp_path / "s.tif", bands=4, descriptions=("blue", "green", "red", "nir"))
    out = tmp_path / "e.parquet"
    rc = cli.main(["embed", str(scene), "--model", str(backbone), "--out", str(out), "--params",
                   str(repo_root / "params.yaml"), "--band-names", "red,green,blue", "--device", "cpu"])
    assert rc == 0 and "9 tiles" in capsys.readouterr().out
    assert json.loads(pq.read_schema(out).metadata[b"gfm"])["bands"] == [3, 2, 1]
    rc = cli.main(["embed", str(scene), "--model", str(backbone), "--out", str(tmp_path / "x.parquet"),
                   "--params", str(repo_root / "params.yaml"), "--bands", "1,2", "--device", "cpu"])
    assert rc == 2 and "2 band(s) selected [1, 2], the model expects (3: red, green, blue)" in capsys.readouterr().err
    assert cli.main(["predict", str(scene), "--params", str(repo_root / "params.yaml")]) == 2
    assert "gfm predict needs --model, --out" in capsys.readouterr().err


def test_embed_of_an_all_nodata_scene_fails_and_leaves_nothing(tmp_path, backbone):
    loaded = load_exported(backbone)
    scene = write_scene(tmp_path / "empty.tif", np.zeros((3, 70, 70), np.uint8), nodata=0)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match="every one of the 4 tiles is nodata"):
        embed_scene(scene, loaded.model, loaded.contract, out / "e.parquet", device="cpu", raster=out / "e.tif")
    assert list(out.iterdir()) == []


def test_a_tile_the_backbone_cannot_take_is_refused_by_name(tmp_path, backbone):
    loaded = load_exported(backbone)  # a Swin built for 64 px inputs
    scene = random_scene(tmp_path / "s.tif", h=100, w=100)
    with pytest.raises(DataValidationError, match=r"does not take \[1, 3, 48, 48\] tiles .*tile=64"):
        embed_scene(scene, loaded.model, loaded.contract, tmp_path / "e.parquet", tile=48, device="cpu")


def test_bf16_autocast_on_cpu_is_close_to_fp32(tmp_path, backbone):
    loaded = load_exported(backbone)
    scene = random_scene(tmp_path / "s.tif", h=64, w=128)
    runs = {p: pq.read_table(embed_scene(scene, loaded.model, loaded.contract, tmp_path / f"{p}.parquet",
                                         device="cpu", precision=p).out)["embedding"].to_pylist()
            for p in ("fp32", "bf16")}
    a, b = np.array(runs["fp32"]), np.array(runs["bf16"])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert a.shape == b.shape and a.shape[0] == 2 and cos.min() > 0.99
    assert not np.array_equal(a, b)  # autocast did run in bfloat16


def test_nearest_tiles_by_cosine(tmp_path, backbone):
    from gfm_core.inference.similar import nearest, tile_vector

    loaded = load_exported(backbone)
    array = np.random.default_rng(5).integers(1, 255, (3, 128, 192), dtype=np.uint8)
    array[:, 64:, 128:] = array[:, :64, :64]  # tile (1, 2) repeats tile (0, 0)
    scene = write_scene(tmp_path / "s.tif", array)
    res = embed_scene(scene, loaded.model, loaded.contract, tmp_path / "e.parquet", device="cpu")
    hits = nearest(res.out, tile_vector(res.out, 0, 0), k=3)
    assert [(h["row"], h["col"]) for h in hits[:2]] in ([(0, 0), (1, 2)], [(1, 2), (0, 0)])
    assert hits[1]["similarity"] == pytest.approx(1.0, abs=1e-5) and hits[2]["similarity"] < hits[1]["similarity"]
    assert len(hits) == 3 and parse_polygon_wkb(hits[0]["geometry"])
    with pytest.raises(DataValidationError, match="no tile at row 5"):
        tile_vector(res.out, 5, 0)
