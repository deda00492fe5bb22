"""Where GeoPile's images live and how to read them: typed source specs, presets, and ingestion settings.

A :class:`SourceSpec` names one folder (relative to the data root) and how to read the images in it. Three
ways to get one:

- :data:`PRESETS` / :func:`get_preset`: the five GeoPile sources (paper Table 2) in the layout each is
  distributed in, with their GSD ranges. ``get_preset("resisc45", root="elsewhere")`` moves one.
- :func:`discover_sources`: GFM's own ``GeoPileV0/<source>/<class>/<image>`` layout; every subfolder of
  the pile folder becomes a source, and folders whose names match a preset (``NWPU-RESISC45``, ``patternnet``,
  ...) inherit its settings. :func:`discover_geopile` does the same from the folder above ``GeoPileV0``.

One convention for roots: a source's ``root`` is relative to the folder the pile is read from (``ingest.root``,
the ``data_root`` of ``build_manifest``, ``list_pile`` and ``write_shards``).
- :func:`folder_source`: any folder of GeoTIFF/JPEG/PNG files.

The class of an image is the first folder below its source root (torchvision ``ImageFolder``'s rule, which GFM
uses); GFM ignores labels during pretraining, the manifest keeps them for audits.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gfm_core.data.raster.reader import DEFAULT_MAX_PIXELS
from gfm_core.errors import ConfigError

IMAGE_PATTERNS: tuple[str, ...] = ("*.tif", "*.tiff", "*.jpg", "*.jpeg", "*.png")
"""File-name patterns of the generic image source (matched case-insensitively)."""

GEOPILE_DIR = "GeoPileV0"
"""The folder name GFM's data loader looks for (``data/data_simmim.py``)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceSpec(BaseModel):
    """One image source of the pile.

    Attributes:
        name: short unique id (``naip``, ``resisc45``); the manifest's ``source`` column.
        root: the source's folder, relative to the data root (POSIX style, no ``..``).
        patterns: file-name globs that select images (case-insensitive); other files are ignored.
        bands: 1-based bands to read, in order; None = every non-alpha band.
        value_range: ``(lo, hi)`` mapped to ``[0, 1]``; None = the dtype's default (see ``raster``).
        gsd_range: ``(min, max)`` ground sample distance in metres the source is documented to have.
        default_gsd: GSD recorded for images without georeferencing (plain JPEG/PNG); None = unknown.
        expected_bands: when set, files with another band count are quarantined.
        description: provenance and layout notes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    root: PurePosixPath
    patterns: tuple[str, ...] = IMAGE_PATTERNS
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    gsd_range: tuple[float, float] | None = None
    default_gsd: float | None = Field(None, gt=0)
    expected_bands: int | None = Field(None, ge=1)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                f"source name {v!r} must be letters, digits, '_', '.', '-' (not starting with a symbol)"
            )
        return v

    @field_validator("root", mode="before")
    @classmethod
    def _root(cls, v: object) -> PurePosixPath:
        p = PurePosixPath(str(v).replace(os.sep, "/")) if isinstance(v, (str, Path, PurePosixPath)) else v
        if not isinstance(p, PurePosixPath):
            raise ValueError(f"root must be a path, got {type(v).__name__}")
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"root {str(v)!r} must be relative to the data root and must not contain '..'")
        return p

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(not p or "/" in p for p in v):
            raise ValueError(f"patterns must be non-empty file-name globs without '/', got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        if self.bands is not None:
            if not self.bands or min(self.bands) < 1:
                raise ValueError(f"bands must be 1-based band indexes, got {self.bands}")
            if self.expected_bands is not None and max(self.bands) > self.expected_bands:
                raise ValueError(f"bands {self.bands} ask for more than expected_bands={self.expected_bands}")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {self.value_range}")
        if self.gsd_range is not None:
            lo, hi = self.gsd_range
            if not 0 < lo <= hi:
                raise ValueError(
                    f"gsd_range must be (min, max) metres with 0 < min <= max, got {self.gsd_range}"
                )
            if self.default_gsd is not None and not lo <= self.default_gsd <= hi:
                raise ValueError(f"default_gsd {self.default_gsd} lies outside gsd_range {self.gsd_range}")
        return self

    def with_root(self, root: str | PurePosixPath, *, name: str | None = None) -> SourceSpec:
        """The same source at another folder (and optionally under another name)."""
        return self.model_validate({**self.model_dump(), "root": root, "name": name or self.name})

    def gsd_in_range(self, gsd: float | None) -> bool | None:
        """Whether ``gsd`` lies in ``gsd_range`` (1 % tolerance); None when either is unknown."""
        if gsd is None or self.gsd_range is None:
            return None
        lo, hi = self.gsd_range
        return lo * 0.99 <= gsd <= hi * 1.01


class IngestSettings(BaseModel):
    """How :func:`gfm_core.data.ingest.manifest.build_manifest` treats files.

    Attributes:
        min_size: images narrower or shorter than this are quarantined (pretraining crops 192 px; GeoPile's
            smallest chips are 256 px; the demo pile's crops start at 64 px).
        max_pixels: headers claiming more than this many samples (width x height x bands) are quarantined
            before any pixel is read.
        max_nodata_fraction: images with a larger nodata share are quarantined (1.0 keeps all but all-nodata).
        allow_nonfinite: treat NaN/Inf pixels as nodata instead of quarantining the file.
        near_dup_max_hamming: perceptual-hash Hamming distance (of 64 bits) at or under which an image is
            flagged ``near_duplicate_of`` an earlier one; None disables the flagging.
        quarantine_copy: also copy quarantined regular files (inside the data root) to
            ``<out_dir>/quarantine/<relative path>``. The originals are never moved or deleted.
        skip_hidden: ignore files and folders whose names start with '.' (``.DS_Store``, AppleDouble
            ``._x.jpg`` files, ``.git``).
        workers: reader processes; None = ``os.cpu_count()``; 0 = read in this process (debugging; a GDAL
            crash then takes the caller down).
        chunk_size: images per task sent to a worker process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_size: int = Field(64, ge=2)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_nodata_fraction: float = Field(1.0, gt=0, le=1)
    allow_nonfinite: bool = False
    near_dup_max_hamming: int | None = Field(4, ge=0, le=32)
    quarantine_copy: bool = False
    skip_hidden: bool = True
    workers: int | None = Field(None, ge=0)
    chunk_size: int = Field(16, ge=1)


def _spec(**kw: object) -> SourceSpec:
    return SourceSpec.model_validate(kw)


_RGB = (1, 2, 3)

PRESETS: dict[str, SourceSpec] = {
    s.name: s
    for s in (
        _spec(
            name="naip",
            root="naip",
            bands=_RGB,
            gsd_range=(0.6, 1.0),
            default_gsd=1.0,
            description="NAIP aerial imagery, unlabelled, 300k chips in GeoPile; paper Table 2 lists 1 m "
            "(NAIP is 1 m before 2016 and 0.6 m since). USGS EarthExplorer / Planetary Computer 'naip'. "
            "4-band RGBN GeoTIFFs are read as RGB.",
        ),
        _spec(
            name="rsd46-whu",
            root="RSD46-WHU",
            bands=_RGB,
            gsd_range=(0.5, 2.0),
            description="RSD46-WHU, 116,893 images, 46 classes, 0.5-2 m (RSIA-LIESMARS-WHU/RSD46-WHU); "
            "layout <root>/<class>/<image>.",
        ),
        _spec(
            name="mlrsnet",
            root="MLRSNet/Images",
            bands=_RGB,
            gsd_range=(0.1, 10.0),
            description="MLRSNet, 109,161 images, 46 scenes, 0.1-10 m (Mendeley 10.17632/7j9bv9vwsx); "
            "layout MLRSNet/Images/<category>/<image>.jpg.",
        ),
        _spec(
            name="resisc45",
            root="NWPU-RESISC45",
            bands=_RGB,
            gsd_range=(0.2, 30.0),
            description="NWPU-RESISC45, 31,500 256x256 JPEGs, 45 classes, 0.2-30 m; "
            "layout NWPU-RESISC45/<class>/<class>_NNN.jpg.",
        ),
        _spec(
            name="patternnet",
            root="PatternNet/images",
            bands=_RGB,
            gsd_range=(0.1, 0.8),
            description="PatternNet, 30,400 256x256 JPEGs, 38 classes; the paper lists 0.1-0.8 m (other "
            "listings give 0.062-4.693 m); layout PatternNet/images/<class>/<image>.jpg.",
        ),
    )
}
"""The five GeoPile sources (paper Table 2) in the layouts they are distributed in.

Labelled sources carry no ``default_gsd``: their GSD varies per image over up to two orders of magnitude, so a
single value would be invented; their manifest ``gsd`` is null unless the file is georeferenced.
"""

_ALIASES = {
    "naip": "naip",
    "rsd46whu": "rsd46-whu",
    "rsd46": "rsd46-whu",
    "mlrsnet": "mlrsnet",
    "resisc45": "resisc45",
    "nwpuresisc45": "resisc45",
    "patternnet": "patternnet",
}


def _alias_key(folder: str) -> str:
    return re.sub(r"[^a-z0-9]", "", folder.lower())


def get_preset(name: str, root: str | PurePosixPath | None = None) -> SourceSpec:
    """A preset by name (or a folder-name alias such as ``NWPU-RESISC45``), optionally moved to ``root``.

    Raises:
        ConfigError: unknown name; the message lists the presets.
    """
    key = name if name in PRESETS else _ALIASES.get(_alias_key(name))
    if key is None:
        raise ConfigError(
            f"unknown GeoPile source preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        )
    spec = PRESETS[key]
    return spec if root is None else spec.with_root(root)


def folder_source(name: str, root: str | PurePosixPath, **fields: object) -> SourceSpec:
    """A generic source: every GeoTIFF/JPEG/PNG under ``root`` (other :class:`SourceSpec` fields by keyword).

    Raises:
        ConfigError: a field is invalid.
    """
    try:
        return SourceSpec.model_validate({"name": name, "root": root, **fields})
    except ValidationError as e:
        raise ConfigError(f"source {name!r}: {_errors(e)}") from None


def _errors(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
    )


def discover_sources(pile_root: str | Path, *, skip_hidden: bool = True) -> list[SourceSpec]:
    """One source per subfolder of ``pile_root``, with roots relative to ``pile_root`` (``ingest.root``).

    Folders named like a preset (case and punctuation ignored: ``NWPU-RESISC45``, ``PatternNet``, ``naip``)
    take that preset's name and settings, and its inner layout when the folder holds it (``MLRSNet/Images``,
    ``PatternNet/images``: the class is then the folder below it); any other folder becomes a generic
    :func:`folder_source` named after the folder. Sources come back sorted by folder name.

    Raises:
        ConfigError: the folder is missing, holds no subfolders, or two folders map to the same source name.
    """
    base = Path(pile_root)
    if not base.is_dir():
        raise ConfigError(
            f"{base}: GeoPile folder not found (expected {base}/<source>/<class>/<image>; set ingest.root)"
        )
    specs: list[SourceSpec] = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if not entry.is_dir() or (skip_hidden and entry.name.startswith(".")):
            continue
        root = PurePosixPath(entry.name)
        key = _ALIASES.get(_alias_key(entry.name))
        if key is not None:
            inner = PurePosixPath(*PRESETS[key].root.parts[1:]) if len(PRESETS[key].root.parts) > 1 else None
            if inner is not None and (base / root / inner).is_dir():
                root = root / inner
            specs.append(PRESETS[key].with_root(root))
        else:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", entry.name).lstrip("_.-") or "source"
            specs.append(folder_source(name, root, description=f"auto-discovered folder {entry.name}"))
    if not specs:
        raise ConfigError(f"{base}: no source subfolders (GFM's layout is <pile>/<source>/<class>/<image>)")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{base}: several folders map to the source name(s) {dupes}; rename one of them")
    return specs


def discover_geopile(
    data_root: str | Path, geopile_dir: str = GEOPILE_DIR, *, skip_hidden: bool = True
) -> list[SourceSpec]:
    """:func:`discover_sources` of ``<data_root>/<geopile_dir>``, with roots relative to ``data_root``.

    For ``build_manifest(data_root, ...)``; with ``ingest.root`` pointing at the pile folder itself, use
    :func:`discover_sources` (roots relative to the pile folder).

    Raises:
        ConfigError: as :func:`discover_sources`.
    """
    return [
        s.with_root(PurePosixPath(geopile_dir) / s.root)
        for s in discover_sources(Path(data_root) / geopile_dir, skip_hidden=skip_hidden)
    ]
