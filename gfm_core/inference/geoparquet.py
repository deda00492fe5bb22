"""GeoParquet 1.1 pieces written by hand (no shapely/pyproj/geopandas): WKB polygons and the ``geo`` metadata.

A tile's footprint is the polygon of its four corners through the scene's affine transform (exact for rotated
grids too), exterior ring counter-clockwise as GeoParquet recommends. The CRS is PROJJSON from rasterio
(``CRS.to_dict(projjson=True)``); when rasterio cannot give PROJJSON, ``crs`` is null (unknown) and the WKT is
kept in the file's ``gfm`` metadata (``crs_wkt``), which is always written.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from affine import Affine

GEOPARQUET_VERSION = "1.1.0"
_WKB_POLYGON = 3


def tile_ring(transform: Affine, y: int, x: int, h: int, w: int) -> list[tuple[float, float]]:
    """The closed, counter-clockwise ring (5 points) of the pixel window ``(y, x, h, w)`` in CRS coordinates."""
    corners = [transform @ (c, r) for c, r in ((x, y), (x + w, y), (x + w, y + h), (x, y + h))]
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True))
    if area2 < 0:  # clockwise (a north-up grid, y down) -> reverse
        corners = corners[::-1]
    return [*corners, corners[0]]


def polygon_wkb(ring: Sequence[tuple[float, float]]) -> bytes:
    """ISO WKB (little endian) of a one-ring polygon."""
    head = struct.pack("<BIII", 1, _WKB_POLYGON, 1, len(ring))
    return head + b"".join(struct.pack("<dd", float(px), float(py)) for px, py in ring)


def parse_polygon_wkb(data: bytes) -> list[tuple[float, float]]:
    """The exterior ring of a WKB polygon written by :func:`polygon_wkb` (for checks and readers).

    Raises:
        ValueError: not a little-endian one-ring WKB polygon.
    """
    order, kind, rings, n = struct.unpack_from("<BIII", data, 0)
    if order != 1 or kind != _WKB_POLYGON or rings != 1 or len(data) != 13 + 16 * n:
        raise ValueError(f"not a little-endian single-ring WKB polygon (order={order}, type={kind}, rings={rings})")
    return [struct.unpack_from("<dd", data, 13 + 16 * i) for i in range(n)]


def crs_projjson(crs: Any) -> dict[str, Any] | None:
    """PROJJSON of a rasterio CRS, or None when there is no CRS or rasterio cannot express it."""
    if crs is None:
        return None
    try:
        return dict(crs.to_dict(projjson=True))
    except Exception:  # rasterio's CRSError for CRSs PROJ cannot write as PROJJSON; the WKT is kept instead
        return None


def geo_metadata(crs: Any, bbox: Sequence[float] | None) -> dict[str, Any]:
    """The ``geo`` key of a GeoParquet 1.1 file with one WKB polygon column ``geometry``."""
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs_projjson(crs),
                              "orientation": "counterclockwise"}
    if bbox is not None:
        column["bbox"] = [float(v) for v in bbox]
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def schema_metadata(crs: Any, bbox: Sequence[float] | None, gfm: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Parquet key-value metadata: ``geo`` (GeoParquet) and ``gfm`` (model, scene, tiling; the CRS as WKT)."""
    gfm = {**dict(gfm), "crs_wkt": crs.to_wkt() if crs is not None else None}
    return {b"geo": json.dumps(geo_metadata(crs, bbox)).encode(), b"gfm": json.dumps(gfm, default=str).encode()}
