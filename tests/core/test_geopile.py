"""GeoPile ingestion on a real pile of generated rasters: manifest, quarantine, duplicates, leakage, stats."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine
from helpers.rasters import make_geotiff, make_photo, pattern, to_dtype
from PIL import Image
from pydantic import ValidationError

from gfm_core.data.ingest.contamination import contamination_check
from gfm_core.data.ingest.dedup import hamming_join, near_duplicates, perceptual_hash
from gfm_core.data.ingest.manifest import MANIFEST_SCHEMA, build_manifest, manifest_content_hash
from gfm_core.data.ingest.sources import (
    PRESETS,
    IngestSettings,
    SourceSpec,
    discover_geopile,
    folder_source,
    get_preset,
)
from gfm_core.data.ingest.stats import compute_norm_stats, load_norm_stats, write_norm_stats
from gfm_core.data.ingest.workers import map_isolated
from gfm_core.data.raster.reader import read_image
from gfm_core.errors import ConfigError, DataValidationError

G = "GeoPileV0"
SETTINGS = IngestSettings(min_size=16, max_nodata_fraction=0.5, workers=0)


def rescaled_jpeg(src: Path, dst: Path, size: int, quality: int = 70) -> Path:
    """A re-encoded, resized copy of an 8-bit image (what a scraper or a mirror does to a picture)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(dst, quality=quality)
    return dst


def build_pile(base: Path) -> tuple[Path, list[SourceSpec], set[str], dict[str, str]]:
    """A pile with good files of every kind and one file per failure kind.

    Returns the data root, the sources, the relative paths that must be accepted, and the expected quarantine
    reason (prefix) for each bad path.
    """
    root = base / "data"
    outside = base / "outside"
    good: set[str] = set()
    bad: dict[str, str] = {}

    def ok(rel: str) -> str:
        good.add(rel)
        return str(root / rel)

    # NAIP: 4-band RGBN GeoTIFFs read as RGB; a PNG chip without georeferencing gets the preset's 1 m
    naip = f"{G}/naip"
    make_geotiff(ok(f"{naip}/m_3807/tile_a.tif"), bands=4, size=48, crs="EPSG:26917", res=1.0, seed=1)
    make_geotiff(ok(f"{naip}/m_3807/tile_b.tif"), bands=4, size=48, crs="EPSG:26917", res=0.6, seed=2)
    make_geotiff(ok(f"{naip}/m_3808/tile_c.tif"), bands=4, size=48, crs="EPSG:26917", res=30.0, seed=3)
    make_photo(ok(f"{naip}/m_3808/chip.png"), size=40, seed=4)
    (root / naip / "m_3808" / "alias.tif").symlink_to("../m_3807/tile_a.tif")  # inside the root: a duplicate
    bad[f"{naip}/m_3808/alias.tif"] = f"exact duplicate of {naip}/m_3807/tile_a.tif"

    # RESISC45 in its distributed folder name: JPEGs per class
    res = f"{G}/NWPU-RESISC45"
    a = make_photo(ok(f"{res}/airport/airport_001.jpg"), size=64, seed=10)
    make_photo(ok(f"{res}/airport/airport_002.jpg"), size=64, seed=11)
    make_photo(ok(f"{res}/forest/forest_001.jpg"), size=64, seed=12)
    rescaled_jpeg(a, Path(ok(f"{res}/airport/airport_001_small.jpg")), 48)  # near-duplicate, kept and flagged
    (root / res / "forest" / "forest_copy.jpg").write_bytes(a.read_bytes())
    bad[f"{res}/forest/forest_copy.jpg"] = f"exact duplicate of {res}/airport/airport_001.jpg"
    (root / res / "forest" / "empty.jpg").touch()
    bad[f"{res}/forest/empty.jpg"] = "empty file (0 bytes)"
    (root / res / "forest" / "notes.jpg").write_text("this is a label file with the wrong extension\n")
    bad[f"{res}/forest/notes.jpg"] = "not a readable raster image (GDAL: "
    full = make_photo(root / res / "forest" / "cut.jpg", size=64, seed=13).read_bytes()
    (root / res / "forest" / "cut.jpg").write_bytes(full[: len(full) // 2])
    bad[f"{res}/forest/cut.jpg"] = "truncated or corrupt pixel data (GDAL: "
    make_photo(root / res / "forest" / "dot.jpg", size=1, seed=14)
    bad[f"{res}/forest/dot.jpg"] = "image is 1x1 pixels, smaller than the minimum 16x16"
    make_photo(root / res / "forest" / "small.jpg", size=(12, 40), seed=15)
    bad[f"{res}/forest/small.jpg"] = "image is 40x12 pixels, smaller than the minimum 16x16"
    make_photo(root / res / "forest" / "grey.jpg", size=32, bands=1, seed=16)
    bad[f"{res}/forest/grey.jpg"] = "band 3 requested but the file has 1 band(s)"
    (root / res / "forest" / "labels.csv").write_text("file,label\n")  # ignored: matches no pattern
    (root / res / "forest" / "._forest_001.jpg").write_bytes(
        b"\x00\x05\x16\x07AppleDouble"
    )  # hidden: skipped

    # an unknown folder: a generic source with default scaling for each dtype
    s2 = f"{G}/sentinel2_l2a"
    ok16 = make_geotiff(ok(f"{s2}/t33/u16.tif"), bands=4, size=32, dtype="uint16", res=10.0, seed=20)
    make_geotiff(ok(f"{s2}/t33/i16.tif"), bands=4, size=32, dtype="int16", res=10.0, seed=21, nodata=-9999)
    make_geotiff(ok(f"{s2}/t33/f32.tif"), bands=4, size=32, dtype="float32", res=20.0, seed=22)
    nan = pattern(4, 32, seed=23).astype("float32")
    nan[2, 3, 3] = np.nan
    make_geotiff(root / s2 / "t33" / "nan.tif", data=nan)
    bad[f"{s2}/t33/nan.tif"] = "1 NaN and 0 Inf pixel value(s) where the file declares no NaN nodata"
    make_geotiff(root / s2 / "t33" / "void.tif", data=np.zeros((4, 32, 32), "uint16"), nodata=0)
    bad[f"{s2}/t33/void.tif"] = "all 1024 pixels are nodata"
    half = to_dtype(pattern(4, 32, seed=24), "uint16")
    half[:, :24, :] = 0
    make_geotiff(root / s2 / "t33" / "mostly_void.tif", data=half, nodata=0)
    bad[f"{s2}/t33/mostly_void.tif"] = "nodata fraction 0.750 exceeds max_nodata_fraction 0.5"
    make_geotiff(root / s2 / "t33" / "complex.tif", data=np.ones((1, 32, 32), "complex64"))
    bad[f"{s2}/t33/complex.tif"] = "unsupported data type complex64"
    with rasterio.open(
        root / s2 / "t33" / "huge.tif",
        "w",
        driver="GTiff",
        width=50000,
        height=50000,
        count=4,
        dtype="uint16",
        tiled=True,
        blockxsize=512,
        blockysize=512,
        sparse_ok=True,
        crs="EPSG:32633",
        transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0),
    ):
        pass
    bad[f"{s2}/t33/huge.tif"] = "header claims 50000x50000x4 = 10,000,000,000 samples, over max_pixels="
    tif = ok16.read_bytes()
    (root / s2 / "t33" / "cut.tif").write_bytes(tif[: len(tif) // 2])
    bad[f"{s2}/t33/cut.tif"] = "truncated or corrupt pixel data (GDAL: "
    (root / s2 / "t33" / "gone.tif").symlink_to(root / s2 / "t33" / "deleted.tif")
    bad[f"{s2}/t33/gone.tif"] = "broken symlink (target "
    secret = make_geotiff(outside / "secret.tif", seed=25)
    (root / s2 / "t33" / "escape.tif").symlink_to(secret)
    bad[f"{s2}/t33/escape.tif"] = "resolves outside the data root"
    make_geotiff(outside / "more" / "x.tif", seed=26)
    (root / s2 / "linked").symlink_to(outside / "more", target_is_directory=True)
    bad[f"{s2}/linked"] = "folder symlink resolves outside the data root"
    os.mkfifo(root / s2 / "t33" / "pipe.tif")
    bad[f"{s2}/t33/pipe.tif"] = "not a regular file: it is a special file"
    if os.geteuid() != 0:  # root reads everything; test_raster covers the permission reason as nobody
        locked = make_geotiff(root / s2 / "t33" / "locked.tif", seed=27)
        locked.chmod(0)
        bad[f"{s2}/t33/locked.tif"] = "permission denied"

    # a source outside GeoPileV0 that insists on 4 bands
    make_geotiff(ok("extra/scene/four.tif"), bands=4, size=32, seed=30)
    make_geotiff(root / "extra" / "scene" / "three.tif", bands=3, size=32, seed=31)
    bad["extra/scene/three.tif"] = "3 band(s), expected 4"

    sources = [*discover_geopile(root), folder_source("extra", "extra", expected_bands=4)]
    return root, sources, good, bad


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Mode and content hash of every entry under ``root`` (symlinks by target, FIFOs without reading)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = (st.st_mode, os.readlink(p))
            elif p.is_file():
                out[str(p)] = (
                    st.st_mode,
                    hashlib.sha256(p.read_bytes()).hexdigest() if st.st_mode & 0o444 else "",
                )
            else:
                out[str(p)] = (st.st_mode, "")
    return out


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    base = tmp_path_factory.mktemp("pile")
    root, sources, good, bad = build_pile(base)
    before = snapshot(root)
    report = build_manifest(root, sources, base / "out", settings=SETTINGS, progress=False)
    return dict(base=base, root=root, sources=sources, good=good, bad=bad, report=report, before=before)


# ------------------------------------------------------------------------------------------ sources


def test_discover_geopile_maps_known_folders_to_presets(pile):
    by_name = {s.name: s for s in pile["sources"]}
    assert [s.name for s in pile["sources"]] == ["resisc45", "naip", "sentinel2_l2a", "extra"]
    assert by_name["resisc45"].root.as_posix() == f"{G}/NWPU-RESISC45"
    assert by_name["resisc45"].gsd_range == PRESETS["resisc45"].gsd_range == (0.2, 30.0)
    assert by_name["naip"].default_gsd == 1.0 and by_name["naip"].bands == (1, 2, 3)
    generic = by_name["sentinel2_l2a"]
    assert generic.bands is None and generic.gsd_range is None and generic.patterns[0] == "*.tif"


def test_presets_cover_the_five_geopile_sources():
    assert sorted(PRESETS) == ["mlrsnet", "naip", "patternnet", "resisc45", "rsd46-whu"]
    assert PRESETS["mlrsnet"].gsd_range == (0.1, 10.0) and PRESETS["patternnet"].gsd_range == (0.1, 0.8)
    assert PRESETS["rsd46-whu"].gsd_range == (0.5, 2.0) and PRESETS["naip"].gsd_range[1] == 1.0
    assert get_preset("PatternNet").name == "patternnet"
    assert get_preset("resisc45", root="mirror/resisc").root.as_posix() == "mirror/resisc"
    with pytest.raises(ConfigError, match="valid presets: mlrsnet, naip"):
        get_preset("sentinel")


def test_source_spec_validation():
    with pytest.raises(ValidationError, match="must not contain"):
        SourceSpec(name="x", root="../elsewhere")
    with pytest.raises(ValidationError, match="must be relative"):
        SourceSpec(name="x", root="/abs")
    with pytest.raises(ValidationError, match="outside gsd_range"):
        SourceSpec(name="x", root="x", gsd_range=(1, 2), default_gsd=5)
    with pytest.raises(ValidationError, match="extra"):
        SourceSpec(name="x", root="x", band=(1,))
    with pytest.raises(ConfigError, match="source 'x'"):
        folder_source("x", "x", value_range=(5, 1))
    with pytest.raises(ValidationError):
        IngestSettings(min_size=1)


# ------------------------------------------------------------------------------------------ manifest


def test_every_good_file_is_in_the_manifest(pile):
    table = pq.read_table(pile["report"].manifest_path)
    paths = table.column("path").to_pylist()
    assert set(paths) == pile["good"]
    assert paths == sorted(paths)  # deterministic row order
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    report = pile["report"]
    assert report.accepted == len(pile["good"]) and report.ignored == 1
    assert report.candidates == len(pile["good"]) + len(pile["bad"]) - 1  # the folder symlink is no file
    s2_bad = sum(p.startswith(f"{G}/sentinel2_l2a/") for p in pile["bad"])
    assert s2_bad >= 10 and report.per_source["sentinel2_l2a"] == {"accepted": 3, "quarantined": s2_bad}


def test_every_bad_file_is_quarantined_with_its_reason(pile):
    report = pile["report"]
    got = {e.path: e.reason for e in report.entries}
    assert set(got) == set(pile["bad"])
    for path, expected in pile["bad"].items():
        assert got[path].startswith(expected), (path, got[path])
    assert report.quarantined == len(pile["bad"]) and report.exact_duplicates == 2
    on_disk = json.loads(report.quarantine_path.read_text())
    assert [e["path"] for e in on_disk["entries"]] == sorted(got)
    assert on_disk["manifest_content_hash"] == report.content_hash
    assert {e["path"]: e["reason"] for e in on_disk["entries"]} == got
    assert 0 < report.bad_fraction < 1


def test_ingestion_never_touches_the_users_files(pile):
    assert snapshot(pile["root"]) == pile["before"]
    assert not list((pile["root"]).rglob("*.aux.xml"))
    assert not (pile["base"] / "out" / "quarantine").exists()  # copies are opt-in


def test_manifest_rows_scaling_gsd_and_stats(pile):
    rows = {r["path"]: r for r in pq.read_table(pile["report"].manifest_path).to_pylist()}
    naip_a = rows[f"{G}/naip/m_3807/tile_a.tif"]
    assert naip_a["bands"] == 4 and naip_a["channels"] == [1, 2, 3]
    assert naip_a["gsd"] == pytest.approx(1.0) and naip_a["gsd_source"] == "georef" and naip_a["gsd_in_range"]
    assert naip_a["crs"] == "EPSG:26917" and naip_a["class_name"] == "m_3807" and naip_a["subdir"] == "m_3807"
    assert rows[f"{G}/naip/m_3808/tile_c.tif"]["gsd_in_range"] is False  # 30 m is no NAIP
    chip = rows[f"{G}/naip/m_3808/chip.png"]
    assert chip["gsd"] == 1.0 and chip["gsd_source"] == "source_default" and chip["crs"] is None
    jpg = rows[f"{G}/NWPU-RESISC45/forest/forest_001.jpg"]
    assert jpg["gsd"] is None and jpg["gsd_source"] is None and jpg["gsd_in_range"] is None
    u16 = rows[f"{G}/sentinel2_l2a/t33/u16.tif"]
    assert (
        u16["value_range"] == [0.0, 10000.0] and u16["dtype"] == "uint16" and u16["gsd"] == pytest.approx(10)
    )
    assert rows[f"{G}/sentinel2_l2a/t33/f32.tif"]["value_range"] == [0.0, 1.0]
    assert rows[f"{G}/sentinel2_l2a/t33/i16.tif"]["nodata"] == -9999
    img = read_image(pile["root"] / u16["path"])
    np.testing.assert_allclose(u16["mean"], img.array.reshape(4, -1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(u16["std"], img.array.reshape(4, -1).std(1), rtol=1e-5)
    assert u16["valid_pixels"] == 32 * 32 and u16["nodata_fraction"] == 0.0
    assert u16["sha256"] == hashlib.sha256((pile["root"] / u16["path"]).read_bytes()).hexdigest()
    assert u16["phash"] == f"{perceptual_hash(img):016x}"


def test_near_duplicate_flagged_not_removed(pile):
    rows = {r["path"]: r for r in pq.read_table(pile["report"].manifest_path).to_pylist()}
    small = rows[f"{G}/NWPU-RESISC45/airport/airport_001_small.jpg"]
    assert small["near_duplicate_of"] == f"{G}/NWPU-RESISC45/airport/airport_001.jpg"
    assert 0 <= small["near_duplicate_distance"] <= 4
    flagged = [p for p, r in rows.items() if r["near_duplicate_of"]]
    assert flagged == [small["path"]] and pile["report"].near_duplicates == 1


def test_perceptual_hash_matches_imagehash(pile):
    import imagehash

    img = read_image(pile["root"] / G / "NWPU-RESISC45" / "airport" / "airport_002.jpg")
    grey = np.round(img.array.mean(axis=0) * 255).astype(np.uint8)
    assert f"{perceptual_hash(img):016x}" == str(imagehash.phash(Image.fromarray(grey)))


def test_content_hash_is_lineage_of_paths_and_bytes(pile):
    table = pq.read_table(pile["report"].manifest_path)
    rows = list(zip(table.column("path").to_pylist(), table.column("sha256").to_pylist(), strict=True))
    assert manifest_content_hash(rows) == pile["report"].content_hash
    assert manifest_content_hash(reversed(rows)) == pile["report"].content_hash  # order-independent
    assert table.schema.metadata[b"gfm.content_hash"].decode() == pile["report"].content_hash
    quarantine_sha = hashlib.sha256(pile["report"].quarantine_path.read_bytes()).hexdigest()
    assert table.schema.metadata[b"gfm.quarantine_sha256"].decode() == quarantine_sha


def test_process_pool_gives_the_same_manifest(pile, tmp_path):
    report = build_manifest(
        pile["root"], pile["sources"], tmp_path / "out", settings=SETTINGS, workers=2, progress=False
    )
    assert report.content_hash == pile["report"].content_hash
    assert (
        report.manifest_path.read_bytes() == pile["report"].manifest_path.read_bytes()
    )  # workers leave no trace
    assert report.entries == pile["report"].entries


def test_rerun_is_byte_identical(pile, tmp_path):
    again = build_manifest(pile["root"], pile["sources"], tmp_path / "o", settings=SETTINGS, progress=False)
    assert again.manifest_path.read_bytes() == pile["report"].manifest_path.read_bytes()
    assert again.quarantine_path.read_bytes() == pile["report"].quarantine_path.read_bytes()


# ------------------------------------------------------------------------------------------ quarantine copies


def test_quarantine_copy_is_opt_in_and_never_exports_outside_files(pile, tmp_path):
    out = tmp_path / "out"
    settings = SETTINGS.model_copy(update={"quarantine_copy": True})
    for _ in range(2):  # a rerun replaces its own copies
        report = build_manifest(pile["root"], pile["sources"], out, settings=settings, progress=False)
    entries = {e.path: e for e in report.entries}
    notes = f"{G}/NWPU-RESISC45/forest/notes.jpg"
    assert entries[notes].copy == f"quarantine/{notes}"
    assert (out / entries[notes].copy).read_bytes() == (pile["root"] / notes).read_bytes()
    assert (pile["root"] / notes).exists()  # copied, not moved
    for path in (
        f"{G}/sentinel2_l2a/t33/escape.tif",
        f"{G}/sentinel2_l2a/linked",
        f"{G}/sentinel2_l2a/t33/gone.tif",
        f"{G}/sentinel2_l2a/t33/pipe.tif",
    ):
        assert entries[path].copy is None
    assert not (out / "quarantine" / G / "sentinel2_l2a" / "t33" / "escape.tif").exists()
    foreign = tmp_path / "foreign"
    (foreign / "quarantine").mkdir(parents=True)
    with pytest.raises(ConfigError, match="was not made by build_manifest"):
        build_manifest(pile["root"], pile["sources"], foreign, settings=settings, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["quarantine"]  # refused before any work: nothing written


# ------------------------------------------------------------------------------------------ config errors


def test_config_errors_are_raised_not_quarantined(pile, tmp_path):
    root, sources = pile["root"], pile["sources"]
    with pytest.raises(ConfigError, match="data root not found"):
        build_manifest(tmp_path / "nowhere", sources, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match=r"folder .* not found"):
        build_manifest(root, [folder_source("x", "missing")], tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="overlap"):
        build_manifest(root, [folder_source("all", G), sources[0]], tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="unique"):
        build_manifest(root, [sources[0], sources[0]], tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match=r"out_dir .* lies inside source"):
        build_manifest(root, sources, root / G / "naip" / "out", progress=False)
    with pytest.raises(ConfigError, match="GeoPile folder not found"):
        discover_geopile(tmp_path)
    link_root = tmp_path / "lr"
    link_root.mkdir()
    (link_root / "away").symlink_to(pile["base"] / "outside", target_is_directory=True)
    with pytest.raises(ConfigError, match="resolves outside the data root"):
        build_manifest(link_root, [folder_source("away", "away")], tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------------ atomic write

_FAILING_RUN = """
import resource, signal, sys
from gfm_core.data.ingest.manifest import build_manifest
from gfm_core.data.ingest.sources import IngestSettings, folder_source
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
settings = IngestSettings(min_size=16, workers=0)
build_manifest(sys.argv[1], [folder_source("s", "s")], sys.argv[2], settings=settings,
               progress=False)
"""


def test_manifest_write_is_atomic(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        make_geotiff(root / "s" / f"{i:02d}.tif", size=16, seed=i)
    out = tmp_path / "out"
    old = build_manifest(
        root, [folder_source("s", "s")], out, settings=IngestSettings(min_size=16, workers=0), progress=False
    )
    old_bytes = old.manifest_path.read_bytes()
    for i in range(3, 20):  # a bigger pile: its manifest no longer fits under the file-size limit
        make_geotiff(root / "s" / f"{i:02d}.tif", size=16, seed=i)
    limit = len(old_bytes) + 512
    assert old.quarantine_path.stat().st_size < limit
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_RUN, str(root), str(out), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert old.manifest_path.read_bytes() == old_bytes  # the previous manifest is intact
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "quarantine.json"]  # no partial file
    new = build_manifest(
        root, [folder_source("s", "s")], out, settings=IngestSettings(min_size=16, workers=0), progress=False
    )
    assert new.accepted == 20 and new.content_hash != old.content_hash


# ------------------------------------------------------------------------------------------ crashes


def _die_on_three(x: int) -> int:
    if x == 3:
        os._exit(139)  # what a segfault in the decoder looks like to the pool
    return x * 10


def test_a_dying_reader_process_costs_only_its_file():
    done: list[int] = []
    out = map_isolated(
        _die_on_three,
        list(range(8)),
        workers=2,
        chunk_size=2,
        on_crash=lambda x, why: -x,
        on_done=done.append,
    )
    assert out == [0, 10, 20, -3, 40, 50, 60, 70]
    assert sum(done) == 8


@pytest.mark.parametrize("max_d", [0, 3, 8])
def test_hamming_join_equals_brute_force(max_d):
    rng = np.random.default_rng(max_d)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    flips = np.array(
        [sum(1 << int(b) for b in rng.choice(64, k, replace=False)) for k in rng.integers(0, 10, 300)]
    )
    a = base[:200] ^ flips[:200].astype(np.uint64)  # noisy copies of most of b, plus unrelated hashes
    b = np.concatenate([base[:150], rng.integers(0, 2**63, size=100, dtype=np.uint64)])
    dist = np.bitwise_count(a[:, None] ^ b[None, :])
    want = {(int(i), int(j), int(dist[i, j])) for i, j in zip(*np.nonzero(dist <= max_d), strict=True)}
    i, j, d = hamming_join(a, b, max_d)
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == want
    assert len(i) == len(want)  # no pair reported twice


def test_near_duplicates_point_to_the_first_earlier_match():
    h = [0b0, 0b1, 0xFF00, 0b11, 0b0, 0xFF01]
    of, dist = near_duplicates(h, 1)
    assert of == [None, 0, None, 1, 0, 2] and dist == [None, 1, None, 1, 0, 1]


def test_near_duplicate_flagging_can_be_disabled(pile, tmp_path):
    settings = SETTINGS.model_copy(update={"near_dup_max_hamming": None})
    report = build_manifest(pile["root"], pile["sources"], tmp_path / "o", settings=settings, progress=False)
    table = pq.read_table(report.manifest_path)
    assert report.near_duplicates == 0 and table.column("near_duplicate_of").null_count == table.num_rows
    assert report.content_hash == pile["report"].content_hash


# ------------------------------------------------------------------------------------------ leakage


def test_contamination_check_finds_planted_test_images(pile, tmp_path):
    root = pile["root"]
    exact = tmp_path / "test" / "exact_copy.tif"
    exact.parent.mkdir()
    exact.write_bytes((root / G / "naip" / "m_3807" / "tile_b.tif").read_bytes())
    rescaled = rescaled_jpeg(
        root / G / "NWPU-RESISC45" / "forest" / "forest_001.jpg", tmp_path / "test" / "f.jpg", 40
    )
    clean = make_photo(tmp_path / "test" / "clean.png", size=64, seed=999)
    offenders = contamination_check(pile["report"].manifest_path, [exact, rescaled, clean])
    found = {(Path(o.test_path).name, o.pile_path, o.kind) for o in offenders}
    assert (exact.name, f"{G}/naip/m_3807/tile_b.tif", "exact") in found
    assert (rescaled.name, f"{G}/NWPU-RESISC45/forest/forest_001.jpg", "near") in found
    assert not [o for o in offenders if o.test_path == str(clean)]
    assert all(o.distance == 0 for o in offenders if o.kind == "exact")
    assert contamination_check(pile["report"].manifest_path, [clean]) == []


def test_contamination_check_refuses_unreadable_test_images(pile, tmp_path):
    broken = tmp_path / "t.png"
    broken.write_text("nope")
    with pytest.raises(Exception, match="not a readable raster"):
        contamination_check(pile["report"].manifest_path, [broken])
    with pytest.raises(DataValidationError, match="cannot read the manifest"):
        contamination_check(tmp_path / "missing.parquet", [])


# ------------------------------------------------------------------------------------------ statistics


def test_norm_stats_equal_pooled_pixels(pile, tmp_path):
    report = pile["report"]
    stats = compute_norm_stats(report.manifest_path)
    assert stats.manifest_hash == report.content_hash
    assert stats.pooled is None  # RGB sources and 4-band sources cannot share one normalisation
    specs = {s.name: s for s in pile["sources"]}
    table = pq.read_table(report.manifest_path).to_pylist()
    for name, got in stats.sources.items():
        spec = specs[name]
        pixels = []
        for r in (r for r in table if r["source"] == name):
            img = read_image(pile["root"] / r["path"], bands=spec.bands, value_range=spec.value_range)
            pixels.append(img.array[:, img.valid].astype(np.float64))
        allpx = np.concatenate(pixels, axis=1)
        np.testing.assert_allclose(got.mean, allpx.mean(axis=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.std, allpx.std(axis=1), rtol=1e-7, atol=1e-10)
        assert got.pixels == allpx.shape[1] and got.images == len(pixels)
    path = write_norm_stats(stats, tmp_path / "norm.json")
    assert load_norm_stats(path) == stats
    assert write_norm_stats(stats, tmp_path / "again.json").read_bytes() == path.read_bytes()
    raw = json.loads(path.read_text())
    assert raw["version"] == 2 and raw["manifest_hash"] == report.content_hash
    raw["version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(raw))
    with pytest.raises(DataValidationError, match="version 99"):
        load_norm_stats(tmp_path / "v99.json")


def test_stretch_is_the_percentiles_of_each_sources_valid_pixels(pile, tmp_path):
    report = pile["report"]
    stats = compute_norm_stats(report.manifest_path, stretch_percentiles=(2, 98), data_root=pile["root"])
    specs = {s.name: s for s in pile["sources"]}
    table = pq.read_table(report.manifest_path).to_pylist()
    for name, got in stats.sources.items():
        rows = [r for r in table if r["source"] == name]
        assert len(rows) <= 64  # small sources: every image and every valid pixel is used, so it is exact
        pixels = [read_image(pile["root"] / r["path"], bands=specs[name].bands, value_range=specs[name].value_range)
                  for r in rows]
        allpx = np.concatenate([i.array[:, i.valid] for i in pixels], axis=1)
        if allpx.shape[1] > 65_536 * len(rows):
            continue
        lo, hi = np.percentile(allpx, (2, 98), axis=1)
        np.testing.assert_allclose(got.stretch.lo, lo, rtol=1e-6)
        np.testing.assert_allclose(got.stretch.hi, hi, rtol=1e-6)
        assert got.stretch.images == len(rows) and got.stretch.percentiles == (2.0, 98.0)
        out = got.stretch.apply(pixels[0].array)
        assert out.min() >= 0 and out.max() <= 1
    path = write_norm_stats(stats, tmp_path / "norm.json")
    assert load_norm_stats(path) == stats  # the stretch round-trips
    assert compute_norm_stats(report.manifest_path).sources[name].stretch is None  # off unless asked for


def test_norm_stats_pooled_only_when_channels_agree(tmp_path):
    root = tmp_path / "d"
    make_geotiff(root / "a" / "x.tif", bands=3, size=16, seed=1)
    make_geotiff(root / "b" / "y.tif", bands=3, size=16, seed=2)
    make_geotiff(root / "c" / "z.tif", bands=4, size=16, seed=3)
    srcs = [folder_source(n, n) for n in "abc"]
    report = build_manifest(
        root, srcs, tmp_path / "o", settings=IngestSettings(min_size=16, workers=0), progress=False
    )
    stats = compute_norm_stats(report.manifest_path)
    assert stats.pooled is None and set(stats.sources) == {"a", "b", "c"}
    table = pq.read_table(report.manifest_path)
    only_rgb = compute_norm_stats(table.filter(pc.not_equal(table.column("source"), "c")))
    assert only_rgb.pooled is not None and only_rgb.pooled.images == 2


def test_source_at_the_data_root(tmp_path):
    root = tmp_path / "pile"
    make_geotiff(root / "top.tif", size=16, seed=1)
    make_geotiff(root / "forest" / "a.tif", size=16, seed=2)
    make_geotiff(root / "forest" / "deep" / "b.tif", size=16, seed=3)
    report = build_manifest(
        root, [folder_source("all", ".")], tmp_path / "out", settings=SETTINGS, progress=False
    )
    rows = {
        r["path"]: (r["class_name"], r["subdir"]) for r in pq.read_table(report.manifest_path).to_pylist()
    }
    assert rows == {
        "top.tif": ("", ""),
        "forest/a.tif": ("forest", "forest"),
        "forest/deep/b.tif": ("forest", "forest/deep"),
    }
    with pytest.raises(ConfigError, match="lies inside source 'all'"):
        build_manifest(root, [folder_source("all", ".")], root / "out", settings=SETTINGS, progress=False)


def test_stats_reject_empty_manifest(tmp_path):
    root = tmp_path / "d"
    (root / "s").mkdir(parents=True)
    report = build_manifest(
        root, [folder_source("s", "s")], tmp_path / "o", settings=IngestSettings(workers=0), progress=False
    )
    assert report.accepted == 0 and report.bad_fraction == 0.0
    with pytest.raises(DataValidationError, match="no images"):
        compute_norm_stats(report.manifest_path)
