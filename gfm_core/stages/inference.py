"""Scenes embedded on demand: the scene keys under ``inference.scenes_dir`` and one scene's embedding run.

A scene key is the file's path relative to ``inference.scenes_dir``, POSIX style (``a.tif``, ``2026/b.tif``);
it is the Dagster partition key of ``scene_embeddings``. Listing scenes imports nothing heavy (the Dagster
sensor calls it); torch loads only when a scene is embedded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gfm_core.config import InferenceCfg, Params
from gfm_core.errors import DataValidationError


@dataclass(frozen=True)
class SceneEmbedResult:
    """One scene's embeddings: the files, the tiles, the speed and the model that made them."""

    scene: Path
    out: Path
    raster: Path | None
    tiles: int
    skipped: int
    dim: int
    seconds: float
    tiles_per_second: float
    model: str
    model_version: str | None
    weights_sha256: str | None


def list_scenes(cfg: InferenceCfg) -> list[str]:
    """The scene keys under ``cfg.scenes_dir`` matching ``cfg.patterns`` (sorted; [] when the folder is absent)."""
    root = cfg.scenes_dir
    if not root.is_dir():
        return []
    files = {p for pattern in cfg.patterns for p in root.rglob(pattern) if p.is_file()}
    return sorted(p.relative_to(root).as_posix() for p in files)


def scene_path(cfg: InferenceCfg, key: str) -> Path:
    """The file of scene ``key``.

    Raises:
        DataValidationError: the key leaves ``scenes_dir`` or names no file.
    """
    rel = PurePosixPath(key)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DataValidationError(f"scene {key!r}: expected a path relative to inference.scenes_dir "
                                  f"({cfg.scenes_dir}), without '..'")
    path = cfg.scenes_dir.joinpath(*rel.parts)
    if not path.is_file():
        raise DataValidationError(f"{path}: scene {key!r} not found under inference.scenes_dir (moved or deleted? "
                                  f"the partition stays until removed)")
    return path


def embeddings_path(cfg: InferenceCfg, key: str) -> Path:
    """Where scene ``key``'s GeoParquet goes: ``<out_dir>/<key with suffix .parquet>``."""
    return cfg.out_dir.joinpath(*PurePosixPath(key).with_suffix(".parquet").parts)


def run_scene_embeddings(params: Params, key: str, *, progress: bool | None = False) -> SceneEmbedResult:
    """Embed scene ``key`` with ``inference.model`` (:func:`gfm_core.inference.embed.embed_scene`).

    A registry URI is resolved against ``params.tracking``.

    Raises:
        DataValidationError, CheckpointError, RasterReadError, ConfigError: a missing scene, an unresolvable
            model, an unreadable scene or a band mismatch.
    """
    from gfm_core.inference.embed import embed_scene
    from gfm_core.inference.source import REGISTRY_PREFIX, load_model

    cfg = params.inference
    scene = scene_path(cfg, key)
    if cfg.model.startswith(REGISTRY_PREFIX):
        from gfm_core import tracking

        tracking.configure(params.tracking)
    loaded = load_model(cfg.model)
    out = embeddings_path(cfg, key)
    res = embed_scene(scene, loaded.model, loaded.contract, out, tile=cfg.tile, stride=cfg.stride,
                      batch_size=cfg.batch_size, bands=cfg.bands, value_range=cfg.value_range, device=cfg.device,
                      precision=cfg.precision, info=loaded.info, progress=progress,
                      raster=out.with_suffix(".tif") if cfg.raster else None)
    version = loaded.info.get("model_version")
    return SceneEmbedResult(
        scene=scene, out=res.out, raster=res.raster, tiles=res.tiles, skipped=res.skipped, dim=res.dim,
        seconds=res.seconds, tiles_per_second=round(res.tiles / res.seconds, 2) if res.seconds > 0 else 0.0,
        model=cfg.model, model_version=None if version is None else str(version),
        weights_sha256=loaded.info.get("weights_sha256"),
    )
