"""The data sections: the embedded demo data, ingestion of the pile, and its validation rules."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from gfm_core.config.base import Section
from gfm_core.data.ingest.sources import IngestSettings, SourceSpec, discover_sources


class DemoDataCfg(Section):
    """Embedded demo data built from real imagery shipped in registry packages."""

    root: Path = Path("data/demo")
    seed: int = 0
    tile_size: int = Field(32, ge=8, description="task tile size in pixels of the 28.5 m NC Landsat grid")
    block_tiles: int = Field(3, ge=1, description="spatial split block edge, in tiles (blocks never straddle splits)")
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    min_valid_fraction: float = Field(0.99, gt=0, le=1, description="tiles with less valid imagery are dropped")
    multilabel_min_fraction: float = Field(0.05, gt=0, lt=1, description="a class is present above this area share")
    scene_classes: tuple[int, ...] = Field((1, 3, 5), description="land-cover codes kept for scene classification")
    sr_scale: int = Field(4, ge=2)
    pile_chip_size: int = Field(256, ge=32, description="other pile rasters are cut whole into chips of about this")
    pile_min_chip: int = Field(64, ge=8, description="chips with a shorter side are dropped")

    @model_validator(mode="after")
    def _check(self) -> DemoDataCfg:
        if abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        if self.tile_size % self.sr_scale:
            raise ValueError(f"tile_size {self.tile_size} must be divisible by sr_scale {self.sr_scale}")
        return self


class IngestCfg(Section):
    """Where the pile is and how to read it.

    ``sources`` lists the pile's sources explicitly (folders relative to ``root``); empty = every subfolder of
    ``root`` is a source (GFM's ``GeoPileV0/<source>/<class>/<image>`` layout; preset names are recognised).
    """

    root: Path = Path("data/GeoPileV0")
    out_dir: Path = Path("outputs/geopile")
    sources: tuple[SourceSpec, ...] = ()
    settings: IngestSettings = IngestSettings()
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    stretch: tuple[float, float] | None = Field(
        None, description="per-source, per-band contrast stretch: these percentiles -> 0 and 1 (e.g. [2, 98]); "
        "None = none (GeoPile's 8-bit images)",
    )
    shard_size: int = Field(256, ge=32, description="training shards keep images with their short side at most this")
    images_per_shard: int = Field(512, ge=1)

    def pile_sources(self) -> list[SourceSpec]:
        """The pile's sources: ``sources`` if listed, else every subfolder of ``root``.

        Either way a source's ``root`` is relative to ``root``, the folder every reader is given.
        """
        return list(self.sources) if self.sources else discover_sources(self.root)



class ValidateCfg(Section):
    """Great-expectations rules the ingested pile must pass before training (``gfm validate``)."""

    min_size: int | None = Field(None, ge=1, description="shortest image side; None = pretrain.student.img_size")
    allowed_bands: tuple[int, ...] = (3,)
    mean_range: tuple[float, float] = Field((0.01, 0.99), description="plausible per-band means of [0, 1] data")
    max_nodata_fraction: float = Field(0.5, ge=0, le=1)
    data_docs: bool = True
    contamination_exclude: tuple[str, ...] = Field(
        (), description="finetune.tasks names left out of the contamination check (their folders may be absent)"
    )
