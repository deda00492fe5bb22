"""Read one image (GeoTIFF, JPEG, PNG, anything GDAL opens) into a scaled float array, or say plainly why not.

Every format goes through rasterio, so a GeoTIFF, a JPEG and a PNG come back in the same form:

- ``array``: float32 ``[C, H, W]`` in ``[0, 1]``; nodata pixels are 0.
- ``valid``: bool ``[H, W]``, False where the pixel is nodata (declared nodata value in every selected band,
  an alpha band or internal mask, or NaN/Inf when that is allowed).
- ``info``: the header (:class:`RasterInfo`): size, bands, dtype, CRS, transform, GSD in metres, nodata.

Scaling rule (``value_range=None``; an explicit ``value_range=(lo, hi)`` always wins):

======================  ==============  ================================================================
file dtype              default range   why
======================  ==============  ================================================================
uint8                   0 .. 255        8-bit imagery (NAIP, every GeoPile JPEG/PNG)
uint16, int16,          0 .. 10000      surface reflectance x 10000 (Sentinel-2 L2A, Landsat C2 style);
uint32, int32                           12-bit DN (0..4095) reads darker, 16-bit DN (0..65535) saturates:
                                        give those sources a ``value_range``
float32, float64        0 .. 1          floats are taken to be reflectance already
======================  ==============  ================================================================

``x -> (x - lo) / (hi - lo)``, then clipped to ``[0, 1]``. The share of valid samples that had to be
clipped is returned as ``saturated_fraction``, so a wrong range shows up in the manifest instead of silently.
Other dtypes (int8, int64, uint64, complex) are refused.

Failures raise :class:`~gfm_core.errors.RasterReadError` with the path and a plain reason, never a raw
rasterio/GDAL/numpy error. Cheap checks run first: the path (inside the data root, not a broken link, a
regular readable non-empty file), then the header (size, sample count, dtype, band count), before any pixel
is read.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import DatasetReader

from gfm_core.errors import ConfigError, RasterReadError

DEFAULT_MIN_SIZE = 8
"""Smallest accepted width and height in pixels for :func:`read_image` (ingestion uses a larger floor)."""

DEFAULT_MAX_PIXELS = 2**28
"""Largest accepted ``width * height * bands`` (2^28 samples = 1 GiB as float32) before anything is read."""

DEFAULT_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "uint8": (0.0, 255.0),
    "uint16": (0.0, 10000.0),
    "int16": (0.0, 10000.0),
    "uint32": (0.0, 10000.0),
    "int32": (0.0, 10000.0),
    "float32": (0.0, 1.0),
    "float64": (0.0, 1.0),
}
"""Per-dtype default ``value_range`` (see the module docstring); the keys are the supported dtypes."""

ALLOWED_DRIVERS: frozenset[str] = frozenset({"GTiff", "JPEG", "PNG", "JP2OpenJPEG", "WEBP", "BMP"})
"""GDAL drivers accepted for image files. GDAL picks the driver from the content, not the name, so a ``.tif``
holding VRT XML would read whatever files it names (outside the data root too): such files are refused."""

# GDAL options for reading: never write .aux.xml files next to the user's data, and don't list a directory on
# every open (GeoPile folders hold tens of thousands of files; sidecars are still found by name).
_GDAL_ENV = {"GDAL_PAM_ENABLED": "NO", "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE"}

_M_PER_DEG_LAT = (111132.954, -559.822, 1.175)  # metres per degree of latitude: a + b cos 2phi + c cos 4phi
_M_PER_DEG_LON = (111412.84, -93.5)  # metres per degree of longitude: a cos phi + b cos 3phi


@dataclass(frozen=True)
class RasterInfo:
    """A raster's header: everything known without reading pixels.

    Attributes:
        path: the path as given.
        driver: GDAL driver short name (``GTiff``, ``JPEG``, ``PNG``, ...).
        width: pixels per row.
        height: rows.
        count: bands in the file.
        dtype: numpy name of the band data type (``uint8``, ``uint16``, ``float32``, ...).
        crs: ``EPSG:XXXX`` (or WKT when there is no code); None when not georeferenced.
        transform: pixel -> CRS affine transform; None when not georeferenced.
        gsd: ground sample distance in metres (mean of the x and y pixel sizes), from the transform in a
            projected CRS, or approximated at the centre latitude in a geographic CRS; None when unknown.
        nodata: the declared nodata value of the first band, or None.
        alpha_bands: 1-based indexes of bands whose colour interpretation is alpha.
    """

    path: Path
    driver: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: Affine | None
    gsd: float | None
    nodata: float | None
    alpha_bands: tuple[int, ...] = ()

    @property
    def georeferenced(self) -> bool:
        """True when the file has both a CRS and a geotransform."""
        return self.crs is not None and self.transform is not None

    @property
    def samples(self) -> int:
        """``width * height * count``: what reading every band would allocate, in values."""
        return self.width * self.height * self.count


@dataclass(frozen=True)
class RasterImage:
    """A decoded image.

    Attributes:
        array: float32 ``[C, H, W]`` in ``[0, 1]``; pixels where ``valid`` is False are 0.
        valid: bool ``[H, W]``, True where the pixel holds data.
        info: the file's header.
        bands: the 1-based band indexes that make up ``array``'s channels, in order.
        value_range: the ``(lo, hi)`` that was mapped to ``[0, 1]``.
        saturated_fraction: share of valid samples outside ``value_range`` before clipping.
    """

    array: np.ndarray
    valid: np.ndarray
    info: RasterInfo
    bands: tuple[int, ...]
    value_range: tuple[float, float]
    saturated_fraction: float

    @property
    def nodata_fraction(self) -> float:
        """Share of pixels that are not valid."""
        return 1.0 - float(self.valid.mean())


def _gdal_message(err: BaseException) -> str:
    """The useful text of a rasterio error: its own message plus the GDAL error it was raised from."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if text and "See previous exception" not in text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return "; ".join(parts) or type(err).__name__


def check_path(path: str | Path, data_root: str | Path | None = None) -> Path:
    """Check that ``path`` is a readable, non-empty regular file (inside ``data_root`` when given).

    Args:
        path: the file.
        data_root: when set, the file's real path (symlinks resolved) must lie inside this folder's real path.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (not resolved).

    Raises:
        RasterReadError: not found, a broken symlink, outside the data root, not a regular file, not
            readable, or empty.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise RasterReadError(path, "file not found")
    real = Path(os.path.realpath(path))
    if data_root is not None:
        root = Path(os.path.realpath(data_root))
        if not real.is_relative_to(root):
            raise RasterReadError(
                path, f"resolves outside the data root {root} (-> {real}); refusing to read it"
            )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RasterReadError(path, f"broken symlink (target {real} does not exist)") from None
    except OSError as e:
        raise RasterReadError(path, f"cannot stat the file ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file (FIFO, socket or device)"
        raise RasterReadError(path, f"not a regular file: it is {kind}")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise RasterReadError(
            path, "permission denied (the file is not readable; fix its permissions)"
        ) from None
    except OSError as e:
        raise RasterReadError(path, f"cannot open the file ({e.strerror})") from e
    if st.st_size == 0:
        raise RasterReadError(path, "empty file (0 bytes)")
    return path


def _gsd_metres(crs: CRS | None, transform: Affine | None, width: int, height: int) -> float | None:
    if crs is None or transform is None:
        return None
    px = math.hypot(transform.a, transform.d)  # pixel size along x, in CRS units
    py = math.hypot(transform.b, transform.e)
    if crs.is_projected:
        try:
            factor = crs.linear_units_factor[1]
        except Exception:  # CRS without linear units: GSD unknown (pyproj raises CRSError, a plain Exception)
            return None
        return 0.5 * (px + py) * factor
    if crs.is_geographic:
        try:
            to_deg = math.degrees(crs.units_factor[1])  # angular unit -> degrees (1.0 for degrees)
        except Exception:
            to_deg = 1.0
        lat = transform.d * width / 2 + transform.e * height / 2 + transform.f  # y of the centre pixel
        phi = math.radians(max(-90.0, min(90.0, lat * to_deg)))
        a, b, c = _M_PER_DEG_LAT
        m_lat = a + b * math.cos(2 * phi) + c * math.cos(4 * phi)
        m_lon = _M_PER_DEG_LON[0] * math.cos(phi) + _M_PER_DEG_LON[1] * math.cos(3 * phi)
        return 0.5 * (px * to_deg * abs(m_lon) + py * to_deg * m_lat)
    return None


def _info(path: Path, src: DatasetReader) -> RasterInfo:
    crs = src.crs
    # GDAL reports the identity for files without a geotransform (plain JPEG/PNG): not georeferenced.
    transform: Affine | None = None if src.transform.is_identity else src.transform
    dtypes = set(src.dtypes)
    return RasterInfo(
        path=path,
        driver=src.driver,
        width=int(src.width),
        height=int(src.height),
        count=int(src.count),
        dtype=src.dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(src.dtypes),
        crs=(crs.to_string() or crs.to_wkt()) if crs else None,
        transform=transform,
        gsd=_gsd_metres(crs, transform, src.width, src.height),
        nodata=None if src.nodata is None else float(src.nodata),
        alpha_bands=tuple(i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha),
    )


def _open(path: Path) -> DatasetReader:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioIOError as e:
        msg = _gdal_message(e)
        if "not recognized" in msg or "not a supported" in msg:
            raise RasterReadError(path, f"not a readable raster image (GDAL: {msg})") from e
        raise RasterReadError(path, f"cannot open as a raster (GDAL: {msg})") from e
    except Exception as e:  # GDAL's CPLE_* errors and anything else from the driver
        raise RasterReadError(
            path, f"cannot open as a raster ({type(e).__name__}: {_gdal_message(e)})"
        ) from e
    if src.driver not in ALLOWED_DRIVERS:
        src.close()
        allowed = ", ".join(sorted(ALLOWED_DRIVERS))
        raise RasterReadError(
            path, f"{src.driver} data is not accepted as an image (allowed formats: {allowed})"
        )
    return src


def inspect_image(path: str | Path, *, data_root: str | Path | None = None) -> RasterInfo:
    """Read only the header of an image (fast: no pixels are decoded).

    Policy checks (size, sample count, dtype, bands) are left to :func:`read_image`; this only fails when the
    path is unusable or the file is not a raster GDAL can open.

    Raises:
        RasterReadError: see :func:`check_path`, or the file is not a readable raster.
    """
    path = check_path(path, data_root)
    with rasterio.Env(**_GDAL_ENV), _open(path) as src:
        return _info(path, src)


def _check_header(info: RasterInfo, *, min_size: int, max_pixels: int, expected_bands: int | None) -> None:
    path = info.path
    if info.samples > max_pixels:
        raise RasterReadError(
            path,
            f"header claims {info.width}x{info.height}x{info.count} = {info.samples:,} samples, over "
            f"max_pixels={max_pixels:,} (a corrupt header, or a scene that must be tiled before ingestion)",
        )
    if info.width < min_size or info.height < min_size:
        raise RasterReadError(
            path,
            f"image is {info.width}x{info.height} pixels, smaller than the minimum {min_size}x{min_size}",
        )
    if info.dtype.startswith("mixed:"):
        raise RasterReadError(
            path, f"bands have different data types ({info.dtype[6:]}); convert the file first"
        )
    if info.dtype not in DEFAULT_VALUE_RANGES:
        supported = ", ".join(DEFAULT_VALUE_RANGES)
        raise RasterReadError(path, f"unsupported data type {info.dtype} (supported: {supported})")
    if expected_bands is not None and info.count != expected_bands:
        raise RasterReadError(
            path,
            f"{info.count} band(s), expected {expected_bands} "
            f"(set the source's expected_bands/bands to match, or remove the file)",
        )


def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f"value_range must be two finite numbers with lo < hi, got {value_range!r}")
    return lo, hi


def read_image(
    path: str | Path,
    *,
    bands: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    expected_bands: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    data_root: str | Path | None = None,
    allow_nonfinite: bool = False,
) -> RasterImage:
    """Read an image as float32 ``[C, H, W]`` in ``[0, 1]`` with a validity mask and its header.

    Args:
        path: GeoTIFF, JPEG, PNG, or any single-image format GDAL reads.
        bands: 1-based band indexes to return, in this order (``(3, 2, 1)`` swaps BGR to RGB). None = every
            band except alpha bands (those feed the valid mask instead).
        value_range: ``(lo, hi)`` mapped to ``[0, 1]``; None = the dtype's default (module docstring).
        expected_bands: when set, the file must have exactly this many bands.
        max_pixels: refuse files whose header claims more than this many samples (``width*height*bands``).
        min_size: refuse images narrower or shorter than this many pixels.
        data_root: when set, refuse paths whose real location (after symlinks) is outside this folder.
        allow_nonfinite: treat NaN/Inf pixels as nodata instead of failing. NaN is always nodata when the
            file declares ``nodata=nan``.

    Returns:
        The decoded :class:`RasterImage`.

    Raises:
        RasterReadError: the file is missing, unreadable, not a raster, truncated, too small, too large,
            of an unsupported dtype or band count, entirely nodata, or holds undeclared NaN/Inf values.
        ConfigError: ``bands`` or ``value_range`` is malformed (a caller error, not the file's).
    """
    if bands is not None:
        bands = tuple(int(b) for b in bands)
        if not bands or min(bands) < 1:
            raise ConfigError(f"bands must be a non-empty sequence of 1-based band indexes, got {bands!r}")
    if value_range is not None:
        value_range = _check_value_range(value_range)
    path = check_path(path, data_root)
    with rasterio.Env(**_GDAL_ENV), _open(path) as src:
        info = _info(path, src)
        _check_header(info, min_size=min_size, max_pixels=max_pixels, expected_bands=expected_bands)
        if bands is None:
            bands = tuple(b for b in range(1, info.count + 1) if b not in info.alpha_bands) or tuple(
                range(1, info.count + 1)
            )
        elif max(bands) > info.count:
            raise RasterReadError(path, f"band {max(bands)} requested but the file has {info.count} band(s)")
        try:
            raw = src.read(indexes=list(bands))
            flags = src.mask_flag_enums[bands[0] - 1]
            mask = None
            if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
                mask = src.read_masks(bands[0]) > 0  # alpha band or internal/external dataset mask
        except Exception as e:  # rasterio/GDAL read failures: short strips, bad compression streams
            raise RasterReadError(path, f"truncated or corrupt pixel data (GDAL: {_gdal_message(e)})") from e
    return _decode(path, info, raw, mask, bands, value_range, allow_nonfinite)


def _decode(
    path: Path,
    info: RasterInfo,
    raw: np.ndarray,
    mask: np.ndarray | None,
    bands: tuple[int, ...],
    value_range: tuple[float, float] | None,
    allow_nonfinite: bool,
) -> RasterImage:
    valid = np.ones(raw.shape[1:], dtype=bool) if mask is None else mask.copy()
    nodata = info.nodata
    nodata_is_nan = nodata is not None and math.isnan(nodata)
    if nodata is not None and not nodata_is_nan and _representable(nodata, raw.dtype):
        valid &= ~np.all(raw == nodata, axis=0)  # GDAL's rule: a pixel is nodata when every band is
    if raw.dtype.kind == "f":
        nan, inf = np.isnan(raw), np.isinf(raw)
        if nodata_is_nan:
            nan_px = nan.all(axis=0)
            valid &= ~nan_px
            nan = nan & ~nan_px  # NaN in only some bands is still a bad value
        bad_px = np.any(nan | inf, axis=0) & valid
        if bad_px.any():
            if not allow_nonfinite:
                raise RasterReadError(
                    path,
                    f"{int(nan[:, bad_px].sum())} NaN and {int(inf[:, bad_px].sum())} Inf pixel value(s) "
                    f"where the file declares no NaN nodata (declare nodata=nan, clean the file, or read "
                    f"with allow_nonfinite=True)",
                )
            valid &= ~bad_px
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise RasterReadError(path, f"all {valid.size} pixels are nodata")
    lo, hi = value_range if value_range is not None else DEFAULT_VALUE_RANGES[info.dtype]
    scaled = (raw.astype(np.float64 if raw.dtype.itemsize > 2 else np.float32) - lo) / (hi - lo)
    inside = scaled[:, valid]
    saturated = float(np.count_nonzero((inside < 0) | (inside > 1))) / inside.size
    array = np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)
    array[:, ~valid] = 0.0
    return RasterImage(
        array=np.ascontiguousarray(array),
        valid=valid,
        info=info,
        bands=bands,
        value_range=(lo, hi),
        saturated_fraction=saturated,
    )


def _representable(value: float, dtype: np.dtype) -> bool:
    """True when ``value`` can occur in an array of ``dtype`` (a uint8 file can't hold nodata=-9999)."""
    if dtype.kind in "ui":
        lim = np.iinfo(dtype)
        return float(value).is_integer() and lim.min <= value <= lim.max
    return True
