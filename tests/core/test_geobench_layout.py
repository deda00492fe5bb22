"""The geobench layout (GEO-Bench-2-style labels.csv folders) on tiny folders built here: label views, tiling,
and errors that name the file, row or band. Real BigEarthNet v2 / TreeSatAI samples: test_real_samples.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rasterio
from helpers.rasters import make_geotiff

from gfm_core.config import TaskCfg
from gfm_core.data.tasks.dataset import TaskDataset
from gfm_core.data.tasks.index import DatasetNotFoundError
from gfm_core.errors import DataValidationError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _task(root: Path, head: str, **kw) -> TaskCfg:
    return TaskCfg(name="t", head=head, layout="geobench", root=root, img_size=16, **kw)


def _ds(cfg: TaskCfg, split: str = "train") -> TaskDataset:
    return TaskDataset(cfg, split, mean=MEAN, std=STD)


def _geobench(root: Path, rows: list[str], header: str = "id,split,label_idx", n_classes: int = 4) -> Path:
    """GEO-Bench-2-style folder: ``<split>/<id>.tif`` + labels.csv + classes.json (rows: csv lines)."""
    (root / "train").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(n_classes)]}))
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    for i, row in enumerate(rows):
        sample_id, split = row.split(",")[:2]
        make_geotiff(root / split / f"{sample_id}.tif", bands=4, size=20, seed=i)
    return root


def test_geobench_layout_multilabel_and_single_label_views(tmp_path):
    rows = ['a,train,2 0,"0.3 0.7"', 'b,train,3,"1.0"', "c,val,1,1.0", 'd,train,"1 3","0.6 0.4"']
    root = _geobench(tmp_path, rows, header="id,split,label_idx,label_area_fraction")
    multi = _ds(_task(root, "multilabel", bands=(1, 2, 3)))
    assert multi.classes == ("c0", "c1", "c2", "c3") and [r.id for r in multi.refs] == ["a", "b", "d"]
    assert [multi[i]["label"].tolist() for i in range(3)] == [[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1]]
    cls = _ds(_task(root, "classification", bands=(1, 2, 3)))
    assert [int(cls[i]["label"]) for i in range(3)] == [0, 3, 1]  # the largest label_area_fraction
    tiled = _ds(_task(root, "multilabel", bands=(1, 2, 3), tile_size=16))
    assert len(tiled) == 12 and tiled[5]["label"].tolist() == [0, 0, 0, 1]  # tiles keep their image's labels
    # without area fractions, classification keeps the single-label samples only
    plain = _geobench(tmp_path / "plain", ["a,train,2 0", "b,train,3", "c,test,0 1"])
    ds = _ds(_task(plain, "classification", bands=(1, 2, 3)))
    assert [r.id for r in ds.refs] == ["b"] and ds.meta["left_out"] == 1
    with pytest.raises(DatasetNotFoundError, match=r"labels\.csv: single-label rows of split 'test' not found"):
        _ds(_task(plain, "classification"), "test")


@pytest.mark.parametrize(
    ("rows", "header", "error", "match"),
    [
        (["a,train,1 4"], None, DataValidationError, r"labels\.csv: row 'a': label_idx \[4\] outside 0\.\.3"),
        (["a,train,x"], None, DataValidationError, r"row 'a': label_idx 'x' is not space-separated numbers"),
        (["a,train,1 2,0.5"], "id,split,label_idx,label_area_fraction", DataValidationError,
         "1 label_area_fraction values for 2 label_idx"),
        (["a,train"], "id,split", DataValidationError, r"missing column\(s\) \['label_idx'\]; found \['id', 'split'\]"),
    ],
)
def test_geobench_label_table_errors_name_the_file_and_row(tmp_path, rows, header, error, match):
    root = _geobench(tmp_path, rows, header=header or "id,split,label_idx")
    with pytest.raises(error, match=match):
        _ds(_task(root, "multilabel"))


def test_geobench_missing_image_and_ambiguous_band_names(tmp_path):
    root = _geobench(tmp_path, ["a,train,1", "b,train,2"])
    (root / "train" / "b.tif").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train/b\.tif: image listed in labels\.csv not found"):
        _ds(_task(root, "multilabel"))
    with rasterio.open(root / "train" / "a.tif", "r+") as f:
        f.descriptions = ("red", "red", "green", "blue")
    (root / "train" / "b.tif").symlink_to(root / "train" / "a.tif")
    ds = _ds(_task(root, "multilabel", band_names=("red", "green", "blue")))
    with pytest.raises(DataValidationError, match=r"a\.tif: band name 'red' matches bands \[1, 2\]"):
        ds[0]


def test_band_names_on_a_file_without_band_descriptions_say_so(tmp_path):
    root = _geobench(tmp_path, ["a,train,1"])
    ds = _ds(_task(root, "multilabel", band_names=("red", "green", "blue")))
    with pytest.raises(DataValidationError, match=r"a\.tif: band\(s\) \['red', 'green', 'blue'\] not found; .*"
                       r"descriptions are \[None, None, None, None\] \(the file names no bands: select them"):
        ds[0]
