"""Bands chosen by name (``TaskCfg.band_names``): resolved against a file's band descriptions, not its order.

A GeoTIFF stores a description per band (GDAL ``DESCRIPTION``; rasterio ``src.descriptions``). Names match them
case-insensitively, so ``[red, green, blue]`` reads TreeSatAI's NIR, G, B, R files as bands (4, 2, 3) and never
as false colour. Sentinel-2 band codes and their STAC ``eo`` common names stand for each other (``red`` finds
``B04``, ``B8A`` finds ``nir08``): BigEarthNet v2 files describe their bands by code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rasterio

from gfm_core.data.raster.header import GDAL_ENV, open_raster
from gfm_core.errors import DataValidationError

#: Sentinel-2 MSI band codes -> STAC eo common names (the aliases a name may use).
S2_COMMON_NAMES: dict[str, str] = {
    "b01": "coastal",
    "b02": "blue",
    "b03": "green",
    "b04": "red",
    "b05": "rededge1",
    "b06": "rededge2",
    "b07": "rededge3",
    "b08": "nir",
    "b8a": "nir08",
    "b09": "watervapour",
    "b10": "cirrus",
    "b11": "swir16",
    "b12": "swir22",
}
_ALIASES = {**S2_COMMON_NAMES, **{v: k for k, v in S2_COMMON_NAMES.items()}}


def band_descriptions(path: Path) -> tuple[str | None, ...]:
    """The band descriptions of a raster, one per band (None where a band has none)."""
    with rasterio.Env(**GDAL_ENV), open_raster(path) as src:
        return tuple(src.descriptions)


def resolve_band_names(path: Path, wanted: Sequence[str], found: Sequence[str | None]) -> tuple[int, ...]:
    """The 1-based indexes of the bands named ``wanted`` among a file's descriptions ``found``.

    A name matches a description case-insensitively, or through its Sentinel-2 code/common-name alias when no
    description equals it.

    Raises:
        DataValidationError: a name matches no band, or two bands share a matching description (the message
            names the file, the wanted and the found names).
    """
    index: dict[str, list[int]] = {}
    for i, desc in enumerate(found, start=1):
        if desc:
            index.setdefault(desc.strip().lower(), []).append(i)
    out, missing = [], []
    for name in wanted:
        key = name.strip().lower()
        hits = index.get(key) or index.get(_ALIASES.get(key, ""), [])
        if len(hits) > 1:
            raise DataValidationError(
                f"{path}: band name {name!r} matches bands {hits} (descriptions {list(found)}); "
                "select them with bands (indexes) instead"
            )
        if hits:
            out.append(hits[0])
        else:
            missing.append(name)
    if missing:
        hint = "" if any(found) else " (the file names no bands: select them with bands, 1-based indexes)"
        raise DataValidationError(
            f"{path}: band(s) {missing} not found; wanted band_names {list(wanted)}, the file's band descriptions "
            f"are {list(found)}{hint}"
        )
    return tuple(out)
