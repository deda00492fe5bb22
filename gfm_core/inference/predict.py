"""Tiled prediction over a whole scene: any ``[B, C, t, t] -> [B, K, t*s, t*s]`` model, blended, to a GeoTIFF.

The scene is read one window at a time (:class:`~gfm_core.inference.scene.Scene`), normalised by the band
contract, batched through the model (:class:`~gfm_core.inference.runner.TileRunner`), and each output tile is
weighted by the separable ramp of :mod:`~gfm_core.inference.tiles` times its valid-pixel mask and blended in a
strip that is written row block by row block (:class:`~gfm_core.inference.writer.StripWriter`). The output keeps
the input's CRS; its transform is the input's, scaled by ``1 / scale`` for a super-resolution model
(``scale`` output pixels per input pixel). Tiles with no valid pixel are skipped; pixels that are nodata in the
input are nodata in the output. With ``after`` (change detection), the scene is the *before* date and the model
a siamese one taking ``[B, 2, C, H, W]`` (:mod:`~gfm_core.inference.pairs`); a pixel is nodata in the output
where it is nodata on either date.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from torch import nn

from gfm_core.errors import DataValidationError
from gfm_core.inference.bands import BandContract
from gfm_core.inference.pairs import PairModel, PairScene, pair_contract
from gfm_core.inference.runner import TileRunner, batched, probe, progress_bar
from gfm_core.inference.scene import Scene, pad_to
from gfm_core.inference.tiles import Tile, TilePlan, blend_weight, plan_tiles
from gfm_core.inference.writer import Output, StripWriter


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_scene` wrote: the GeoTIFF, its size and bands, tiles run and skipped, seconds."""

    out: Path
    height: int
    width: int
    channels: int
    output: str
    tiles: int
    skipped: int
    seconds: float


def _probe(runner: TileRunner, contract: BandContract, th: int, tw: int, scale: int) -> int:
    """Output channels of the model, checking that a ``th x tw`` tile maps to ``th*scale x tw*scale``.

    Raises:
        DataValidationError: the model rejects the tile or maps it to another shape.
    """
    out = probe(runner, contract.count, th, contract.input_size[1])
    if out.ndim != 4 or out.shape[-2:] != (th * scale, tw * scale):
        raise DataValidationError(
            f"the model maps a [1, {contract.count}, {th}, {tw}] tile to {list(out.shape)}; tiled prediction "
            f"needs [B, K, {th * scale}, {tw * scale}] (scale={scale})"
        )
    return int(out.shape[1])


def predict_scene(
    scene: str | Path,
    model: nn.Module,
    contract: BandContract,
    out: str | Path,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    scale: int = 1,
    output: Output = "classes",
    batch_size: int = 8,
    bands: Sequence[int] | None = None,
    band_names: Sequence[str] | None = None,
    value_range: Sequence[float] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool | None = None,
    after: str | Path | None = None,
) -> PredictResult:
    """Predict ``scene`` tile by tile with ``model`` and write the blended result to ``out`` (module docstring).

    Args:
        scene: a GeoTIFF/COG (any size; bands chosen as :mod:`gfm_core.inference.bands` says).
        model: maps normalised ``[B, C, tile, tile]`` to ``[B, K, tile*scale, tile*scale]``.
        contract: the model's bands and normalisation.
        out: the output GeoTIFF (written atomically).
        tile: window size (default: the contract's input size); overlap: shared pixels (default: tile / 4).
        output: ``classes`` (uint8 argmax of blended softmax), ``probabilities`` or ``values`` (float32).
        after: the second date of a change pair (``scene`` is the first); ``model`` then takes
            ``[B, 2, C, tile, tile]``. The two must share size, CRS and transform.

    Raises:
        ConfigError, DataValidationError, RasterReadError: bad options, a band mismatch, an unreadable scene,
            or a model whose output does not have the tile's (scaled) size.
    """
    t0 = time.perf_counter()
    tile = tile or contract.input_size[1]
    overlap = tile // 4 if overlap is None else overlap
    runner = TileRunner(model if after is None else PairModel(model), device=device, precision=precision)
    read_kw: dict[str, Any] = {"bands": bands, "band_names": band_names, "value_range": value_range}
    src: Scene | PairScene = Scene(scene, contract, **read_kw) if after is None else \
        PairScene(scene, after, contract, **read_kw)
    contract = contract if after is None else pair_contract(contract)  # the stacked pair's bands from here on
    with src:
        plan = plan_tiles(src.height, src.width, tile, overlap)
        k = _probe(runner, contract, tile, tile, scale)
        transform = src.transform @ Affine.scale(1 / scale)
        weight = blend_weight(plan.tile_h * scale, plan.tile_w * scale, overlap * scale)
        with StripWriter(out, height=src.height * scale, width=src.width * scale, channels=k, output=output,
                         crs=src.crs, transform=transform) as writer, \
                progress_bar(len(plan), f"predict {Path(scene).name}", progress) as bar:
            skipped = _run(src, plan, runner, contract, writer, weight, scale, batch_size, bar)
    return PredictResult(Path(out), src.height * scale, src.width * scale, 1 if output == "classes" else k, output,
                         len(plan) - skipped, skipped, round(time.perf_counter() - t0, 3))


def _run(src: Scene | PairScene, plan: TilePlan, runner: TileRunner, contract: BandContract, writer: StripWriter,
         weight: np.ndarray, scale: int, batch_size: int, bar: object) -> int:
    """Every tile of ``plan`` through the model into ``writer``, in row-major batches; returns tiles skipped."""
    cols, skipped, done = plan.shape[1], 0, 0
    for chunk in batched(plan, batch_size):
        batch: list[tuple[Tile, np.ndarray]] = []
        xs: list[np.ndarray] = []
        for t in chunk:
            win = src.read(t)
            if not win.valid.any():
                skipped += 1
                continue
            batch.append((t, win.valid))
            xs.append(pad_to(contract.normalise(win.x01), plan.tile, plan.tile))
        if xs:
            outs = runner(np.stack(xs))
            for (t, valid), o in zip(batch, outs, strict=True):
                h, w = t.h * scale, t.w * scale
                mask = np.repeat(np.repeat(valid, scale, axis=0), scale, axis=1) if scale > 1 else valid
                writer.add(t.y * scale, t.x * scale, o[:, :h, :w], weight * mask)
        done += len(chunk)
        done_rows = done // cols
        final = plan.ys[done_rows] * scale if done_rows < len(plan.ys) else writer.height
        writer.flush(final)
        bar.update(len(chunk))  # type: ignore[attr-defined]
    return skipped
