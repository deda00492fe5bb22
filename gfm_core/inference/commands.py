"""``gfm embed``, ``gfm predict``, ``gfm similar``: their arguments and what they run (no torch import until a
command runs).

- ``gfm embed SCENE --model models:/gfm-foundation@champion|backbone.safetensors --out tiles.parquet``
- ``gfm predict SCENE --model <finetune run folder> --out map.tif`` (a change model: ``SCENE`` is the before
  date, ``--after AFTER.tif`` the after date, on the same grid)
- ``gfm similar tiles.parquet --query ROW,COL --k 8 --out grid.png`` (the scene the file names, or ``--scene``)

``--bands 3,2,1`` (1-based indexes) or ``--band-names red,green,blue`` choose the scene's bands; by default the
model's band contract decides (:mod:`gfm_core.inference.bands`). A registry URI is resolved against the
params' tracking store (``tracking.uri``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band indexes like 3,2,1, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like 0,10000, got {text!r}") from None
    return lo, hi


def _cell(text: str) -> tuple[int, int]:
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a grid position ROW,COL like 3,4, got {text!r}") from None
    return row, col


def add_similar_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``gfm similar``."""
    p.add_argument("embeddings", type=Path, nargs="?", help="a GeoParquet written by gfm embed; required")
    p.add_argument("--query", type=_cell, help="the query tile's grid position ROW,COL; required")
    p.add_argument("--k", type=int, default=8, help="neighbours to show (default: %(default)s)")
    p.add_argument("--out", type=Path, help="the PNG grid to write; required")
    p.add_argument("--scene", type=Path, default=None, help="the scene (default: the one the file was made from)")
    p.add_argument("--cell", type=int, default=160, help="panel size in pixels (default: %(default)s)")


def run_similar(args: argparse.Namespace) -> list[str]:
    """Draw the query tile and its nearest neighbours; returns the lines to print (one per tile)."""
    from gfm_core.errors import ConfigError
    from gfm_core.inference.gallery import similar_grid

    missing = [flag for flag, value in (("EMBEDDINGS", args.embeddings), ("--query", args.query), ("--out", args.out))
               if value is None]
    if missing:
        raise ConfigError(f"gfm similar needs {', '.join(missing)} (see gfm similar --help)")
    row, col = args.query
    res = similar_grid(args.embeddings, args.out, row=row, col=col, k=args.k, scene=args.scene, cell=args.cell)
    return [f"grid: {res.out} ({res.width} x {res.height} px)"] + [
        f"  ({h['row']},{h['col']}) x={h['x']} y={h['y']} cos {h['similarity']:.4f}" for h in res.hits]


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments of ``gfm embed`` / ``gfm predict``."""
    p.add_argument("scene", type=Path, nargs="?", help="input GeoTIFF/COG (any size); required")
    model_help = ("registry URI (models:/gfm-foundation@champion, models:/gfm-foundation/latest) or an exported "
                  "backbone.safetensors" if name == "embed" else "a fine-tuning run folder "
                  "(<finetune.out_dir>/<task>/<model>/seed_<s>: result.json + checkpoints/), with the params it "
                  "was trained with")
    p.add_argument("--model", help=model_help + "; required")
    p.add_argument("--out", type=Path, help="output " + (".parquet" if name == "embed" else ".tif") + "; required")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--bands", type=_ints, default=None, help="1-based band indexes in the model's order, e.g. 3,2,1")
    sel.add_argument("--band-names", type=_names, default=None,
                     help="bands by description, in the model's order, e.g. red,green,blue (or B04,B03,B02)")
    p.add_argument("--value-range", type=_range, default=None,
                   help="LO,HI mapped to [0, 1] (default: by dtype: uint8 0,255; 16-bit 0,10000; float 0,1)")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: the model's input size)")
    p.add_argument("--batch", type=int, default=16, help="tiles per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast (default: %(default)s)")
    if name == "embed":
        p.add_argument("--stride", type=int, default=None, help="tile step (default: the tile: no overlap)")
        p.add_argument("--raster", type=Path, default=None,
                       help="also write a low-resolution embedding GeoTIFF here (one pixel per tile, a band per "
                            "feature)")
    else:
        p.add_argument("--overlap", type=int, default=None,
                       help="pixels shared by neighbouring tiles (default: tile/4)")
        p.add_argument("--output", choices=("classes", "probabilities", "values"), default=None,
                       help="classes (uint8 map), probabilities or values (float32); default: the head's")
        p.add_argument("--after", type=Path, default=None,
                       help="change detection: the after date (SCENE is the before date; same size, CRS and "
                            "transform)")


def _check(args: argparse.Namespace, name: str) -> None:
    """SCENE, --model and --out are required (checked here, so that every subcommand parses with only ``-S``).

    Raises:
        ConfigError: one of them is missing.
    """
    from gfm_core.errors import ConfigError

    missing = [flag for flag, value in (("SCENE", args.scene), ("--model", args.model), ("--out", args.out))
               if value is None]
    if missing:
        raise ConfigError(f"gfm {name} needs {', '.join(missing)} (see gfm {name} --help)")


def run_embed(args: argparse.Namespace, params: Any) -> list[str]:
    """Embed ``args.scene``; returns the lines to print."""
    _check(args, "embed")
    from gfm_core.inference.embed import embed_scene
    from gfm_core.inference.source import REGISTRY_PREFIX, load_model

    if str(args.model).startswith(REGISTRY_PREFIX):
        from gfm_core import tracking

        tracking.configure(params.tracking)
    loaded = load_model(args.model)
    res = embed_scene(args.scene, loaded.model, loaded.contract, args.out, tile=args.tile, stride=args.stride,
                      batch_size=args.batch, bands=args.bands, band_names=args.band_names,
                      value_range=args.value_range, device=args.device, precision=args.precision, info=loaded.info,
                      raster=args.raster)
    version = loaded.info.get("model_version")
    return [f"embeddings: {res.out} ({res.tiles} tiles x {res.dim}, {res.skipped} nodata tiles skipped, "
            f"{res.seconds:.1f} s; {loaded.info.get('arch')}{f' version {version}' if version else ''}, "
            f"weights {str(loaded.info.get('weights_sha256'))[:12]})"] + \
        ([f"embedding raster: {res.raster}"] if res.raster is not None else [])


def run_predict(args: argparse.Namespace, params: Any) -> list[str]:
    """Predict ``args.scene`` with a fine-tuned task model; returns the lines to print."""
    _check(args, "predict")
    from gfm_core.errors import ConfigError
    from gfm_core.inference.finetuned import load_finetuned
    from gfm_core.inference.predict import predict_scene

    loaded, task = load_finetuned(args.model, params)
    if task["pair"] != (args.after is not None):
        raise ConfigError(f"{args.model}: a {loaded.info['head']} model " + (
            "compares two dates: pass the after scene with --after AFTER.tif" if task["pair"] else
            "takes one scene: --after is only for change models"))
    chosen = args.bands is not None or args.band_names is not None
    res = predict_scene(
        args.scene, loaded.model, loaded.contract, args.out, tile=args.tile, overlap=args.overlap,
        output=args.output or task["output"], batch_size=args.batch,
        bands=args.bands if chosen else task["bands"], band_names=args.band_names if chosen else task["band_names"],
        value_range=args.value_range or task["value_range"], device=args.device, precision=args.precision,
        after=args.after,
    )
    return [f"{res.output}: {res.out} ({res.channels} band(s), {res.height} x {res.width}; {res.tiles} tiles, "
            f"{res.skipped} nodata tiles skipped, {res.seconds:.1f} s; {loaded.info['task']} / {loaded.info['model']})"]
