"""The ``inference`` section: whole scenes embedded on demand (the Dagster ``scene_embeddings`` asset)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from gfm_core.config.base import Section


class InferenceCfg(Section):
    """Where scenes are found, which model embeds them, where the GeoParquet files go.

    A scene is a GeoTIFF/COG under ``scenes_dir`` (matched by ``patterns``, subfolders included); its embeddings
    go to ``out_dir`` under the same relative path with the suffix ``.parquet``. ``model`` is a registry URI or an
    exported ``backbone.safetensors``: before the demo promotes a champion, use ``models:/gfm-foundation/latest``
    (the newest registered version) or the export itself (``outputs/pretrain/backbone.safetensors``).
    """

    scenes_dir: Path = Field(Path("data/scenes"), description="scenes to embed (each is one Dagster partition)")
    patterns: tuple[str, ...] = Field(("*.tif", "*.tiff"), min_length=1, description="scene file globs")
    out_dir: Path = Field(Path("outputs/embeddings"), description="<relative scene path>.parquet per scene")
    model: str = Field("models:/gfm-foundation@champion",
                       description="registry URI (alias, version or /latest) or an exported backbone file")
    bands: tuple[int, ...] | None = Field(None, description="1-based band indexes in the model's order (every "
                                          "scene); None = the model's band contract decides")
    value_range: tuple[float, float] | None = Field(
        None, description="LO, HI mapped to [0, 1]; None = by dtype (uint8 0-255, 16-bit 0-10000, float 0-1)")
    tile: int | None = Field(None, gt=0, description="tile size in px; None = the model's input size")
    stride: int | None = Field(None, gt=0, description="tile step in px; None = the tile (no overlap)")
    batch_size: int = Field(16, gt=0)
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    precision: Literal["fp32", "bf16"] = "fp32"
    raster: bool = Field(False, description="also write the one-pixel-per-tile embedding GeoTIFF (.tif)")
