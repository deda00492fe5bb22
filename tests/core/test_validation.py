"""GeoPile validation with Great Expectations 1.x: a clean pile passes, each broken rule fails readably."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.rasters import make_geotiff, make_photo

from gfm_core.data.ingest.manifest import build_manifest, manifest_content_hash
from gfm_core.data.ingest.sources import IngestSettings, folder_source
from gfm_core.data.ingest.validation import DOCS_DIR, VALIDATION_NAME, validate_manifest
from gfm_core.errors import DataValidationError

SOURCES = [folder_source("photos", "photos"), folder_source("geo", "geo", gsd_range=(5.0, 20.0))]
LIMITS = dict(min_size=32, max_nodata_fraction=0.2, max_bad_fraction=0.25, allowed_bands=(3,))


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    """A clean pile: 4 photos, 3 GeoTIFFs at 10 m, and one unreadable file (1 of 8 quarantined)."""
    base = tmp_path_factory.mktemp("vpile")
    root = base / "data"
    for i in range(4):
        make_photo(root / "photos" / f"c{i % 2}" / f"p{i}.png", size=40, seed=i)
    for i in range(3):
        make_geotiff(root / "geo" / f"g{i}.tif", size=40, res=10.0, seed=10 + i)
    (root / "photos" / "c0" / "broken.png").write_bytes(b"not an image")
    settings = IngestSettings(min_size=16, workers=0)
    report = build_manifest(root, SOURCES, base / "ingest", settings=settings, progress=False)
    assert (report.accepted, report.quarantined) == (7, 1)
    return report


def run(manifest: Path, out: Path, **kw):
    return validate_manifest(manifest, SOURCES, out_dir=out, **{**LIMITS, **kw})


def test_clean_pile_passes_with_results_json_and_data_docs(pile, tmp_path):
    rep = run(pile.manifest_path, tmp_path / "val")
    assert rep.success, rep.summary()
    assert rep.failed == ()
    # not_empty, known_source, allowed_bands, min_size, max_nodata, gsd_range[geo], unique_sha256,
    # band_mean[1..3], max_bad_fraction, quarantine_matches
    assert rep.n_expectations == 12
    assert rep.images == 7
    assert "PASSED" in rep.summary() and "12 expectations" in rep.summary()
    doc = json.loads((tmp_path / "val" / VALIDATION_NAME).read_text())
    assert doc["success"] is True and doc["failed"] == []
    assert doc["statistics"]["evaluated_expectations"] == 12
    assert doc["statistics"]["unsuccessful_expectations"] == 0
    assert doc["manifest_content_hash"] == pile.content_hash
    assert {e["name"] for e in doc["expectations"]} >= {"gsd_range[geo]", "unique_sha256", "band_mean[2]"}
    index = tmp_path / "val" / DOCS_DIR / "index.html"
    assert rep.docs_index == index and index.is_file()
    pages = list((tmp_path / "val" / DOCS_DIR / "validations").rglob("*.html"))
    assert len(pages) == 2  # the manifest suite and the pile suite
    assert "geopile_manifest" in index.read_text()
    assert not [p for p in (tmp_path / "val").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_data_docs_are_replaced_not_accumulated(pile, tmp_path):
    run(pile.manifest_path, tmp_path)
    run(pile.manifest_path, tmp_path)
    assert len(list((tmp_path / DOCS_DIR / "validations").rglob("*.html"))) == 2


# ------------------------------------------------------------------------------------- one case per rule


def _set(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))


def _row_of(table: pa.Table, path_part: str) -> int:
    return next(i for i, p in enumerate(table.column("path").to_pylist()) if path_part in p)


Mutation = Callable[[pa.Table, dict], tuple[pa.Table, dict, str | None]]


def empty(t, q):
    return t.slice(0, 0), q, None


def foreign_source(t, q):
    r = _row_of(t, "p1.png")
    return _set(t, "source", r, "elsewhere"), q, "photos/c1/p1.png"


def four_bands(t, q):
    r = _row_of(t, "g1.tif")
    return _set(t, "channels", r, [1, 2, 3, 4]), q, "geo/g1.tif"


def too_small(t, q):
    r = _row_of(t, "p2.png")
    return _set(t, "width", r, 20), q, "photos/c0/p2.png"


def mostly_nodata(t, q):
    r = _row_of(t, "g0.tif")
    return _set(t, "nodata_fraction", r, 0.6), q, "geo/g0.tif"


def wrong_gsd(t, q):
    r = _row_of(t, "g2.tif")
    return _set(t, "gsd", r, 250.0), q, "geo/g2.tif"


def duplicate(t, q):
    sha = t.column("sha256")[_row_of(t, "p0.png")].as_py()
    return _set(t, "sha256", _row_of(t, "p3.png"), sha), q, "photos/c1/p3.png"


def dark_band(t, q):
    r = _row_of(t, "p1.png")
    return _set(t, "mean", r, [0.5, 0.001, 0.5]), q, "photos/c1/p1.png"


def many_quarantined(t, q):
    extra = [
        {"path": f"photos/c0/bad{i}.png", "source": "photos", "reason": "empty file (0 bytes)"}
        for i in range(4)
    ]
    return t, {**q, "entries": q["entries"] + extra, "count": q["count"] + 4}, "photos/c0/broken.png"


def stale_quarantine(t, q):
    return t, {**q, "manifest_content_hash": "0" * 64}, None


CASES: dict[str, Mutation] = {
    "not_empty": empty,
    "known_source": foreign_source,
    "allowed_bands": four_bands,
    "min_size": too_small,
    "max_nodata": mostly_nodata,
    "gsd_range[geo]": wrong_gsd,
    "unique_sha256": duplicate,
    "band_mean[2]": dark_band,
    "max_bad_fraction": many_quarantined,
    "quarantine_matches": stale_quarantine,
}


@pytest.mark.parametrize("rule", list(CASES))
def test_each_broken_rule_fails_with_a_readable_reason(pile, tmp_path, rule):
    table = pq.read_table(pile.manifest_path)
    quarantine = json.loads(pile.quarantine_path.read_text())
    table, quarantine, offender = CASES[rule](table, quarantine)
    if rule != "quarantine_matches":  # keep quarantine.json consistent with the edited rows
        rows = zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True)
        quarantine["manifest_content_hash"] = manifest_content_hash(rows)
    pq.write_table(table, tmp_path / "manifest.parquet")
    (tmp_path / "quarantine.json").write_text(json.dumps(quarantine))

    rep = run(tmp_path / "manifest.parquet", tmp_path / "val", data_docs=False)

    assert not rep.success
    names = [f.name for f in rep.failed]
    if rule == "not_empty":  # an empty manifest also quarantines 100 % of the pile
        assert names == ["not_empty", "max_bad_fraction"]
    else:
        assert names == [rule]
    summary = rep.summary()
    assert "FAILED" in summary and f"FAIL {rule}:" in summary
    if offender is not None:
        assert offender in summary
        assert any(offender in e for e in rep.failed[0].examples)
    doc = json.loads(rep.json_path.read_text())
    assert doc["success"] is False
    entry = doc["failed"][0]
    assert entry["name"] == rule and entry["type"].startswith("expect_") and entry["sentence"]
    assert doc["statistics"]["unsuccessful_expectations"] == len(names)
    assert rep.docs_index is None and doc["data_docs"] is None


def test_sentences_name_the_threshold(pile, tmp_path):
    table, _, _ = wrong_gsd(pq.read_table(pile.manifest_path), json.loads(pile.quarantine_path.read_text()))
    pq.write_table(table, tmp_path / "manifest.parquet")
    shutil.copy(pile.quarantine_path, tmp_path / "quarantine.json")
    rep = run(tmp_path / "manifest.parquet", tmp_path / "val", data_docs=False)
    (fail,) = rep.failed
    assert fail.column == "gsd" and fail.expectation_type == "expect_column_values_to_be_between"
    assert fail.sentence.startswith("1 of 3 geo images have a GSD outside the source's documented 5-20 m")
    assert fail.examples == ("geo/g2.tif (gsd = 250 m)",)


# ---------------------------------------------------------------------------------------- unreadable input


def test_corrupt_or_missing_manifest_raises_naming_the_file(pile, tmp_path):
    bad = tmp_path / "manifest.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match=r"manifest\.parquet: cannot read the manifest"):
        run(bad, tmp_path / "val")
    with pytest.raises(DataValidationError, match=r"nowhere\.parquet"):
        run(tmp_path / "nowhere.parquet", tmp_path / "val")
    assert not (tmp_path / "val" / VALIDATION_NAME).exists()


def test_missing_or_corrupt_quarantine_raises_naming_the_file(pile, tmp_path):
    shutil.copy(pile.manifest_path, tmp_path / "manifest.parquet")
    with pytest.raises(DataValidationError, match=r"quarantine\.json: quarantine file not found"):
        run(tmp_path / "manifest.parquet", tmp_path / "val")
    (tmp_path / "quarantine.json").write_text("{not json")
    with pytest.raises(DataValidationError, match=r"quarantine\.json: cannot read the quarantine file"):
        run(tmp_path / "manifest.parquet", tmp_path / "val")
