"""read_image / inspect_image on real rasters written with rasterio: scaling, masks, GSD, every bad input."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from helpers.rasters import make_geotiff, make_photo, pattern, to_dtype

from gfm_core.data.raster.header import inspect_image
from gfm_core.data.raster.reader import read_image
from gfm_core.errors import ConfigError, RasterReadError


def reason_of(path, **kw) -> str:
    with pytest.raises(RasterReadError) as exc:
        read_image(path, **kw)
    assert exc.value.path == Path(path)
    assert str(path) in str(exc.value)  # the message names the file
    return exc.value.reason


# ------------------------------------------------------------------------------------------ good files


def test_uint8_geotiff_scaled_by_255_with_metadata(tmp_path):
    data = to_dtype(pattern(3, 32, seed=1), "uint8")
    path = make_geotiff(tmp_path / "a.tif", data=data, res=10.0)
    img = read_image(path)
    assert img.array.dtype == np.float32 and img.array.shape == (3, 32, 32)
    np.testing.assert_allclose(img.array, data / 255.0, atol=1e-6)
    assert img.valid.shape == (32, 32) and img.valid.all() and img.nodata_fraction == 0.0
    info = img.info
    assert (info.driver, info.width, info.height, info.count, info.dtype) == ("GTiff", 32, 32, 3, "uint8")
    assert info.crs == "EPSG:32633" and info.georeferenced
    assert info.gsd == pytest.approx(10.0)
    assert info.transform.c == 500000.0 and info.nodata is None
    assert img.bands == (1, 2, 3) and img.value_range == (0.0, 255.0) and img.saturated_fraction == 0.0


def test_uint16_default_reflectance_scale_and_explicit_range(tmp_path):
    data = np.full((4, 16, 16), 5000, dtype="uint16")
    data[0, 0, 0] = 12000  # above 10000: clipped, counted as saturated
    path = make_geotiff(tmp_path / "s2.tif", data=data)
    img = read_image(path)
    assert img.value_range == (0.0, 10000.0)
    assert img.array[1, 5, 5] == pytest.approx(0.5)
    assert img.array[0, 0, 0] == 1.0
    assert img.saturated_fraction == pytest.approx(1 / data.size)
    twelve_bit = read_image(path, value_range=(0, 4095))
    assert twelve_bit.array[1, 5, 5] == pytest.approx(1.0)  # 5000 > 4095: clipped
    assert read_image(path, value_range=(0, 20000)).array[1, 5, 5] == pytest.approx(0.25)


def test_int16_negative_clipped_and_nodata_masked(tmp_path):
    data = np.full((2, 16, 16), 2500, dtype="int16")
    data[:, 0, :] = -9999  # nodata row in every band
    data[0, 5, 5] = -20  # a negative reflectance: valid, clipped to 0
    path = make_geotiff(tmp_path / "i16.tif", data=data, nodata=-9999)
    img = read_image(path)
    assert not img.valid[0].any() and img.valid[1:].all()
    assert img.nodata_fraction == pytest.approx(1 / 16)
    assert (img.array[:, 0, :] == 0).all()
    assert img.array[0, 5, 5] == 0.0 and img.array[1, 5, 5] == pytest.approx(0.25)
    assert img.info.nodata == -9999


def test_nodata_needs_every_band(tmp_path):
    data = np.full((3, 16, 16), 100, dtype="uint8")
    data[0, 2, 2] = 0  # one dark band: still a valid pixel
    data[:, 3, 3] = 0  # all bands nodata
    img = read_image(make_geotiff(tmp_path / "n.tif", data=data, nodata=0))
    assert img.valid[2, 2] and not img.valid[3, 3]
    assert int((~img.valid).sum()) == 1


def test_float32_default_unit_range(tmp_path):
    data = pattern(3, 16, seed=2).astype("float32")
    data[0, 0, 0] = 1.5
    img = read_image(make_geotiff(tmp_path / "f.tif", data=data))
    assert img.value_range == (0.0, 1.0)
    np.testing.assert_allclose(img.array.ravel()[1:], data.ravel()[1:], atol=1e-6)
    assert img.array[0, 0, 0] == 1.0 and img.saturated_fraction > 0


def test_float32_nan_nodata_is_masked(tmp_path):
    data = pattern(2, 16, seed=3).astype("float32")
    data[:, 4, :] = np.nan
    img = read_image(make_geotiff(tmp_path / "f.tif", data=data, nodata=float("nan")))
    assert not img.valid[4].any() and img.valid.sum() == 15 * 16
    assert np.isfinite(img.array).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_undeclared_nonfinite_values_fail_with_counts(tmp_path, bad):
    data = pattern(2, 16, seed=3).astype("float32")
    data[1, 2, 2] = bad
    path = make_geotiff(tmp_path / "f.tif", data=data)
    reason = reason_of(path)
    expected = "1 NaN and 0 Inf" if np.isnan(bad) else "0 NaN and 1 Inf"
    assert reason.startswith(expected) and "declares no NaN nodata" in reason
    img = read_image(path, allow_nonfinite=True)
    assert not img.valid[2, 2] and img.valid.sum() == 255 and np.isfinite(img.array).all()


def test_inf_is_bad_even_with_nan_nodata(tmp_path):
    data = pattern(2, 16, seed=3).astype("float32")
    data[0, 1, 1] = np.inf
    assert "1 Inf" in reason_of(make_geotiff(tmp_path / "f.tif", data=data, nodata=float("nan")))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_jpeg_and_png_read_like_geotiffs_without_georeferencing(tmp_path, suffix):
    data = to_dtype(pattern(3, 40, seed=4), "uint8")
    path = make_photo(tmp_path / f"photo{suffix}", data=data)
    img = read_image(path)
    assert img.array.shape == (3, 40, 40) and img.array.dtype == np.float32
    if suffix == ".png":
        np.testing.assert_allclose(img.array, data / 255.0, atol=1e-6)
    else:  # JPEG is lossy (and subsamples colour): compare on average
        assert np.abs(img.array - data / 255.0).mean() < 0.03
    info = img.info
    assert info.driver == ("JPEG" if suffix == ".jpg" else "PNG")
    assert info.crs is None and info.transform is None and info.gsd is None and not info.georeferenced
    assert not list(tmp_path.glob("*.aux.xml"))  # reading never writes next to the user's data


def test_png_alpha_band_is_a_mask_not_a_channel(tmp_path):
    data = to_dtype(pattern(4, 16, seed=5), "uint8")
    data[3] = 255
    data[3, :4, :] = 0  # transparent top rows
    path = make_photo(tmp_path / "rgba.png", data=data, bands=4, photometric="RGB")
    img = read_image(path)
    assert img.info.alpha_bands == (4,)
    assert img.bands == (1, 2, 3) and img.array.shape == (3, 16, 16)
    assert not img.valid[:4].any() and img.valid[4:].all()


def test_band_selection_order(tmp_path):
    data = to_dtype(pattern(4, 16, seed=6), "uint16")
    path = make_geotiff(tmp_path / "b.tif", data=data)
    full = read_image(path)
    bgr = read_image(path, bands=[3, 2, 1])
    assert bgr.bands == (3, 2, 1) and bgr.array.shape == (3, 16, 16)
    np.testing.assert_array_equal(bgr.array, full.array[[2, 1, 0]])
    assert "band 5 requested but the file has 4 band(s)" == reason_of(path, bands=(1, 5))
    with pytest.raises(ConfigError, match="1-based"):
        read_image(path, bands=[0, 1])
    with pytest.raises(ConfigError, match="lo < hi"):
        read_image(path, value_range=(10, 10))


def test_gsd_projected_in_feet(tmp_path):
    path = make_geotiff(tmp_path / "ny.tif", crs="EPSG:2263", res=3.0, origin=(1000000, 200000))
    assert inspect_image(path).gsd == pytest.approx(3.0 * 0.3048006096, rel=1e-6)


def test_gsd_geographic_at_centre_latitude(tmp_path):
    res_deg = 1e-5
    path = make_geotiff(tmp_path / "geo.tif", crs="EPSG:4326", res=res_deg, size=64, origin=(10.0, 45.0))
    info = inspect_image(path)
    lat = math.radians(45.0 - 32 * res_deg)
    earth = 6371008.8  # spherical check, independent of the reader's ellipsoidal series
    expected = 0.5 * res_deg * math.pi / 180 * earth * (1 + math.cos(lat))
    assert info.crs == "EPSG:4326"
    assert info.gsd == pytest.approx(expected, rel=0.01)


def test_inspect_reads_only_the_header(tmp_path):
    # 60000 x 60000 x 3 = 10.8 G samples: a sparse file of ~170 kB; reading it would need 43 GB as float32
    huge = tmp_path / "huge.tif"
    with rasterio.open(
        huge,
        "w",
        driver="GTiff",
        width=60000,
        height=60000,
        count=3,
        dtype="uint8",
        tiled=True,
        blockxsize=512,
        blockysize=512,
        sparse_ok=True,
        crs="EPSG:32633",
        transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0),
    ):
        pass
    assert huge.stat().st_size < 1_000_000
    info = inspect_image(huge)
    assert (info.width, info.height, info.count, info.samples) == (60000, 60000, 3, 10_800_000_000)
    reason = reason_of(huge)
    assert reason.startswith("header claims 60000x60000x3 = 10,800,000,000 samples, over max_pixels=")
    assert info.gsd == 10.0 and info.crs == "EPSG:32633"


# ------------------------------------------------------------------------------------------ bad files


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.touch()
    assert reason_of(path) == "empty file (0 bytes)"


def test_truncated_tiff(tmp_path):
    good = make_geotiff(tmp_path / "good.tif", size=64)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert reason_of(cut).startswith("truncated or corrupt pixel data (GDAL: ")


def test_truncated_jpeg(tmp_path):
    good = make_photo(tmp_path / "good.jpg", size=64)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert reason_of(cut).startswith("truncated or corrupt pixel data")


@pytest.mark.parametrize("name", ["notes.tif", "notes.jpg", "notes.png"])
def test_non_image_with_image_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("label,score\nforest,1\n")
    reason = reason_of(path)
    assert reason.startswith("not a readable raster image (GDAL: ") and "not recognized" in reason


def test_wrong_band_count(tmp_path):
    path = make_geotiff(tmp_path / "four.tif", bands=4)
    assert reason_of(path, expected_bands=3).startswith("4 band(s), expected 3")
    assert read_image(path, expected_bands=4).array.shape[0] == 4


def test_all_nodata(tmp_path):
    data = np.zeros((3, 16, 16), dtype="uint8")
    assert reason_of(make_geotiff(tmp_path / "nd.tif", data=data, nodata=0)) == "all 256 pixels are nodata"


def test_all_nan_with_nan_nodata(tmp_path):
    data = np.full((1, 16, 16), np.nan, dtype="float32")
    assert (
        reason_of(make_geotiff(tmp_path / "nd.tif", data=data, nodata=float("nan")))
        == "all 256 pixels are nodata"
    )


@pytest.mark.parametrize("size", [1, 4])
def test_too_small(tmp_path, size):
    path = make_geotiff(tmp_path / "tiny.tif", size=size)
    assert reason_of(path) == f"image is {size}x{size} pixels, smaller than the minimum 8x8"
    assert reason_of(path, min_size=16 if size > 1 else 2).startswith(f"image is {size}x{size} pixels")


def test_min_size_applies_to_each_side(tmp_path):
    path = make_geotiff(tmp_path / "strip.tif", size=(4, 64))
    assert reason_of(path) == "image is 64x4 pixels, smaller than the minimum 8x8"


def test_absurd_dimensions_refused_before_reading(tmp_path):
    path = make_geotiff(tmp_path / "big.tif", size=64)
    reason = reason_of(path, max_pixels=1000)
    assert reason == (
        "header claims 64x64x3 = 12,288 samples, over max_pixels=1,000 "
        "(a corrupt header, or a scene that must be tiled before ingestion)"
    )


@pytest.mark.parametrize("dtype", ["complex64", "int64", "int8"])
def test_unsupported_dtype(tmp_path, dtype):
    data = np.ones((1, 16, 16), dtype=dtype)
    reason = reason_of(make_geotiff(tmp_path / f"{dtype}.tif", data=data))
    assert reason.startswith(f"unsupported data type {dtype} (supported: uint8, uint16")


def test_broken_symlink(tmp_path):
    link = tmp_path / "gone.tif"
    link.symlink_to(tmp_path / "missing-target.tif")
    assert reason_of(link).startswith("broken symlink (target ")


def test_missing_file(tmp_path):
    assert reason_of(tmp_path / "nope.tif") == "file not found"


def test_directory_and_fifo_are_not_regular_files(tmp_path):
    folder = tmp_path / "folder.tif"
    folder.mkdir()
    assert reason_of(folder) == "not a regular file: it is a directory"
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    assert reason_of(fifo) == "not a regular file: it is a special file (FIFO, socket or device)"  # no hang


def test_path_outside_data_root(tmp_path):
    root = tmp_path / "root"
    outside = make_geotiff(tmp_path / "secret" / "s.tif")
    inside = make_geotiff(root / "ok.tif")
    (root / "escape.tif").symlink_to(outside)
    assert read_image(inside, data_root=root).array.shape == (3, 32, 32)
    reason = reason_of(root / "escape.tif", data_root=root)
    assert reason.startswith(f"resolves outside the data root {root.resolve()}")
    assert reason_of(root / ".." / "secret" / "s.tif", data_root=root).startswith(
        "resolves outside the data root"
    )
    assert read_image(root / "escape.tif").array.shape == (3, 32, 32)  # no root given: no check


def test_vrt_disguised_as_tif_is_refused(tmp_path):
    """GDAL goes by content: a VRT named .tif would read any file it names, even outside the root."""
    secret = make_geotiff(tmp_path / "secret" / "s.tif")
    sneaky = tmp_path / "root" / "sneaky.tif"
    sneaky.parent.mkdir()
    sneaky.write_text(
        '<VRTDataset rasterXSize="32" rasterYSize="32"><VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{secret}</SourceFilename><SourceBand>1</SourceBand>'
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )
    reason = reason_of(sneaky, data_root=tmp_path / "root")
    assert reason.startswith("VRT data is not accepted as an image (allowed formats: BMP, GTiff, JP2OpenJPEG")
    with pytest.raises(RasterReadError, match="VRT data is not accepted"):
        inspect_image(sneaky)


def test_unreadable_permissions(tmp_path):
    if os.geteuid() != 0:
        locked = make_geotiff(tmp_path / "locked.tif")
        locked.chmod(0)
        try:
            assert reason_of(locked) == "permission denied (the file is not readable; fix its permissions)"
        finally:
            locked.chmod(0o644)
        return
    # root reads everything: drop the *effective* uid to nobody for the call (the saved uid restores root),
    # in a world-traversable folder so only the file's own mode stands in the way
    folder = Path(tempfile.mkdtemp(prefix="gfm-perm-"))
    try:
        folder.chmod(0o755)
        locked = make_geotiff(folder / "locked.tif")
        good = make_geotiff(folder / "good.tif")
        locked.chmod(0)
        good.chmod(0o644)
        os.seteuid(65534)
        try:
            with pytest.raises(RasterReadError) as exc:
                read_image(locked)
            assert exc.value.reason == "permission denied (the file is not readable; fix its permissions)"
            assert read_image(good).array.shape == (3, 32, 32)
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_errors_are_never_raw_rasterio_errors(tmp_path):
    """Every bad input above surfaces as RasterReadError, and inspect_image agrees on unreadable files."""
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing valid after it
    reason = reason_of(junk)
    assert reason.startswith(
        ("not a readable raster image", "cannot open as a raster", "truncated or corrupt")
    )
    with pytest.raises(RasterReadError):
        inspect_image(junk) if not reason.startswith("truncated") else read_image(junk)
    empty = tmp_path / "e.jpg"
    empty.touch()
    with pytest.raises(RasterReadError, match="empty file"):
        inspect_image(empty)
