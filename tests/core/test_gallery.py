"""``gfm similar``: the query tile and its nearest neighbours by cosine, drawn as a PNG grid from the scene."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from helpers.rasters import make_geotiff
from helpers.registry import tiny_backbone

from gfm_core.errors import DataValidationError
from gfm_core.inference.embed import embed_scene
from gfm_core.inference.gallery import TITLE_PX, similar_grid
from gfm_core.inference.source import load_exported


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A 128 x 192 scene (2 x 3 tiles of 64 px) whose tile (1, 2) repeats tile (0, 0), and its embeddings."""
    tmp = tmp_path_factory.mktemp("gallery")
    loaded = load_exported(tiny_backbone(tmp, 0)[0])
    data = np.random.default_rng(5).integers(1, 255, (3, 128, 192), dtype=np.uint8)
    data[:, 64:, 128:] = data[:, :64, :64]
    scene = make_geotiff(tmp / "scene.tif", data=data)
    res = embed_scene(scene, loaded.model, loaded.contract, tmp / "tiles.parquet", device="cpu")
    return scene, res.out


def test_the_query_is_its_own_nearest_neighbour(tmp_path, embedded):
    _, tiles = embedded
    res = similar_grid(tiles, tmp_path / "grid.png", row=0, col=1, k=2)
    assert (res.hits[0]["row"], res.hits[0]["col"]) == (0, 1) and res.hits[0]["similarity"] == pytest.approx(1.0)
    assert len(res.hits) == 3 and res.hits[1]["similarity"] < 0.9999


def test_the_grid_has_its_size_and_a_twin_tile_is_drawn_alike(tmp_path, embedded):
    _, tiles = embedded
    res = similar_grid(tiles, tmp_path / "grid.png", row=0, col=0, k=4, cell=50)
    assert {(h["row"], h["col"]) for h in res.hits[:2]} == {(0, 0), (1, 2)}  # a tie at cosine 1
    assert len(res.hits) == 5 and [h["similarity"] for h in res.hits] == sorted(
        (h["similarity"] for h in res.hits), reverse=True)
    png = matplotlib.image.imread(res.out)
    assert png.shape[:2] == (res.height, res.width) == (2 * (50 + TITLE_PX), 3 * 50)  # 5 panels in 3 columns
    query, first, second = (png[TITLE_PX:TITLE_PX + 50, c * 50:(c + 1) * 50, :3] for c in (0, 1, 2))
    np.testing.assert_array_equal(first, query)  # the repeated tile is the first neighbour, from the same pixels
    assert query.std() > 0.05 and not np.array_equal(second, query)  # pictures, not blank panels


def test_cli_writes_the_grid_and_names_a_missing_tile(tmp_path, embedded, capsys, repo_root):
    from gfm_core import cli

    scene, tiles = embedded
    out = tmp_path / "g.png"
    rc = cli.main(["similar", str(tiles), "--query", "1,1", "--k", "2", "--out", str(out), "--scene", str(scene),
                   "--params", str(repo_root / "params.yaml")])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0 and printed[0] == f"grid: {out} (320 x 356 px)"  # 3 panels: 2 columns, 2 rows of 160 + title
    assert printed[1].startswith("  (1,1) x=64 y=64 cos 1.0000") and len(printed) == 4
    assert matplotlib.image.imread(out).shape[:2] == (356, 320)
    rc = cli.main(["similar", str(tiles), "--query", "9,0", "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "no tile at row 9, col 0" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert cli.main(["similar", str(tiles), "--out", str(out)]) == 2
    assert "gfm similar needs --query" in capsys.readouterr().err


def test_a_scene_of_another_size_is_refused(tmp_path, embedded):
    _, tiles = embedded
    other = make_geotiff(tmp_path / "other.tif", size=(100, 100))
    with pytest.raises(DataValidationError, match="made from a 128 x 192 scene"):
        similar_grid(tiles, tmp_path / "g.png", row=0, col=0, scene=other)


def test_nodata_is_drawn_grey_and_left_out_of_the_stretch(tmp_path):
    from gfm_core.inference.gallery import NODATA_GREY

    loaded = load_exported(tiny_backbone(tmp_path, 1)[0])
    data = np.random.default_rng(6).integers(1, 255, (3, 64, 128), dtype=np.uint8)
    data[:, :32, :64] = 0  # the top half of tile (0, 0) is nodata
    scene = make_geotiff(tmp_path / "scene.tif", data=data, nodata=0)
    tiles = embed_scene(scene, loaded.model, loaded.contract, tmp_path / "t.parquet", device="cpu").out
    res = similar_grid(tiles, tmp_path / "g.png", row=0, col=0, k=1, cell=64)
    png = matplotlib.image.imread(res.out)[TITLE_PX:TITLE_PX + 64, :64, :3]
    np.testing.assert_allclose(png[:32], NODATA_GREY, atol=1 / 255)
    assert png[32:].min() < 0.05 and png[32:].max() > 0.95  # the valid half spans the stretch
