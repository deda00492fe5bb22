"""A raster's header and path, checked before any pixel is read: :func:`inspect_image` and the read policy.

Every format goes through rasterio (GeoTIFF, JPEG, PNG, anything GDAL opens). Cheap checks run first: the path
(inside the data root, not a broken link, a regular readable non-empty file), then the header (size, sample
count, dtype, band count). Failures raise :class:`~gfm_core.errors.RasterReadError` with the path and a plain
reason, never a raw rasterio/GDAL/numpy error. :func:`~gfm_core.data.raster.reader.read_image` decodes the
pixels.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import DatasetReader

from gfm_core.errors import RasterReadError

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
"""Per-dtype default ``value_range`` (see :mod:`~gfm_core.data.raster.reader`); the keys are the supported dtypes."""

ALLOWED_DRIVERS: frozenset[str] = frozenset({"GTiff", "JPEG", "PNG", "JP2OpenJPEG", "WEBP", "BMP"})
"""GDAL drivers accepted for image files. GDAL picks the driver from the content, not the name, so a ``.tif``
holding VRT XML would read whatever files it names (outside the data root too): such files are refused."""

# GDAL options for reading: never write .aux.xml files next to the user's data, and don't list a directory on
# every open (GeoPile folders hold tens of thousands of files; sidecars are still found by name).
GDAL_ENV = {"GDAL_PAM_ENABLED": "NO", "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE"}

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



def gdal_message(err: BaseException) -> str:
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


def raster_info(path: Path, src: DatasetReader) -> RasterInfo:
    """The header of an open raster (no pixels read)."""
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


def open_raster(path: Path) -> DatasetReader:
    """Open ``path`` with rasterio, accepting only image drivers (:data:`ALLOWED_DRIVERS`).

    Raises:
        RasterReadError: GDAL cannot open it, or it is not an image format (VRT XML, ...).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioIOError as e:
        msg = gdal_message(e)
        if "not recognized" in msg or "not a supported" in msg:
            raise RasterReadError(path, f"not a readable raster image (GDAL: {msg})") from e
        raise RasterReadError(path, f"cannot open as a raster (GDAL: {msg})") from e
    except Exception as e:  # GDAL's CPLE_* errors and anything else from the driver
        raise RasterReadError(
            path, f"cannot open as a raster ({type(e).__name__}: {gdal_message(e)})"
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

    Policy checks (size, sample count, dtype, bands) are left to :func:`~gfm_core.data.raster.reader.read_image`;
    this only fails when the path is unusable or the file is not a raster GDAL can open.

    Raises:
        RasterReadError: see :func:`check_path`, or the file is not a readable raster.
    """
    path = check_path(path, data_root)
    with rasterio.Env(**GDAL_ENV), open_raster(path) as src:
        return raster_info(path, src)


def check_header(info: RasterInfo, *, min_size: int, max_pixels: int, expected_bands: int | None) -> None:
    """Refuse a header over ``max_pixels`` samples, under ``min_size``, of an unsupported dtype or band count.

    Raises:
        RasterReadError: naming the limit and the fix.
    """
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
