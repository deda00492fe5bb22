"""``embed`` on whole scenes: tiles/s per core and peak memory at two scene sizes (4x the pixels).

The scenes are mosaics of the demo pile's real NEON aerial RGB images (``data/demo/pile/neon_aerial``, written by
``gfm demo-data`` / ``make demo``), cropped to 200 x 200 and laid edge to edge in a tiled, deflate-compressed
GeoTIFF (EPSG:32617, 1 m pixels), written block row by block row. Each size is embedded in a fresh subprocess
with one torch thread (``torch.set_num_threads(1)``), so its peak RSS (``ru_maxrss``) is its own; the RSS
after the model is loaded and before the first tile is read is the baseline, and the growth over it is what the
scene costs. Flat memory means the peak ratio of the large to the small scene stays near 1 (the issue asks
<= 1.2 for 4x the pixels).

The backbone is the demo's exported ``outputs/pretrain/backbone.safetensors`` when it exists (``--model`` takes
another export), else a freshly initialised tiny Swin exported to the temporary folder (the timing is then of
that tiny model).

Usage (from the repository root; the default sizes take minutes on one core, ``--size 1024`` is a smoke run)::

    .venv/bin/python benchmarks/embed_throughput.py --size 5120 --json outputs/benchmarks/embed_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PILE = REPO / "data" / "demo" / "pile" / "neon_aerial"
PATCH = 200


def build_scene(path: Path, size: int, sources: list[Path]) -> Path:
    """A ``size x size`` RGB mosaic of ``PATCH``-px crops of ``sources``, written one block row at a time."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    crops = []
    for f in sources:
        with rasterio.open(f) as src:
            if src.count >= 3 and src.height >= PATCH and src.width >= PATCH and src.dtypes[0] == "uint8":
                crops.append(src.read((1, 2, 3), window=Window(0, 0, PATCH, PATCH)))
    if not crops:
        raise SystemExit(f"no uint8 RGB image of at least {PATCH} px among {len(sources)} files")
    n = -(-size // PATCH)
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32617",
               "transform": from_origin(500_000, 4_000_000, 1.0, 1.0), "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(n):
            row = np.concatenate([crops[(r * n + c) % len(crops)] for c in range(n)], axis=2)[:, :, :size]
            h = min(PATCH, size - r * PATCH)
            dst.write(row[:, :h], window=Window(0, r * PATCH, size, h))
    return path


def tiny_export(folder: Path) -> Path:
    """A freshly initialised tiny Swin (64 px) exported like a pretraining backbone."""
    import torch

    from gfm_core.config import PretrainCfg, StudentCfg
    from gfm_core.objectives import build_continual_pretrain, export_backbone

    torch.manual_seed(0)
    student = StudentCfg(arch="swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32,
                         depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    return export_backbone(build_continual_pretrain(PretrainCfg(student=student, alpha=0.0)),
                           folder / "backbone.safetensors")


def child(scene: Path, model: Path, out: Path, batch: int) -> dict:
    """Embed ``scene`` in this process (one torch thread); the measurements as a dict."""
    import torch

    from gfm_core.inference.embed import embed_scene
    from gfm_core.inference.source import load_exported

    torch.set_num_threads(1)
    loaded = load_exported(model)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = embed_scene(scene, loaded.model, loaded.contract, out, batch_size=batch, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tiles": res.tiles, "dim": res.dim, "seconds": round(seconds, 3),
            "tiles_per_s_per_core": round(res.tiles / seconds, 3), "baseline_rss_mb": round(base_kb / 1024, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1), "growth_mb": round((peak_kb - base_kb) / 1024, 1)}


def measure(scene: Path, model: Path, out: Path, batch: int) -> dict:
    """:func:`child` in a fresh interpreter (its own peak RSS)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", str(scene), str(model), str(out), str(batch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"embedding {scene} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Build the two scenes, embed each in a subprocess, print and write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=5120, help="side of the large scene in px (the small one: half)")
    ap.add_argument("--model", type=Path, default=REPO / "outputs" / "pretrain" / "backbone.safetensors")
    ap.add_argument("--pile", type=Path, default=PILE, help="folder of uint8 RGB GeoTIFFs to mosaic")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    sources = sorted(args.pile.rglob("*.tif"))
    if not sources:
        print(f"skipped: no demo imagery under {args.pile}; run `gfm demo-data` (or make demo) first")
        return 0
    with tempfile.TemporaryDirectory(prefix="gfm-embed-bench-") as tmp:
        folder = Path(tmp)
        model = args.model if args.model.is_file() else tiny_export(folder)
        results = {}
        for label, size in (("small", args.size // 2), ("large", args.size)):
            scene = build_scene(folder / f"{label}.tif", size, sources)
            results[label] = {"size": size, **measure(scene, model, folder / f"{label}.parquet", args.batch)}
            scene.unlink()
            print(f"{label}: {size} x {size} px, {results[label]}")
    small, large = results["small"], results["large"]
    summary = {"model": str(model if args.model.is_file() else "tiny swin (random init)"), **results,
               "pixels_ratio": (large["size"] / small["size"]) ** 2,
               "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
               "cpu": os.cpu_count(), "torch_threads": 1}
    print(f"peak RSS ratio for {summary['pixels_ratio']:.0f}x the pixels: {summary['peak_rss_ratio']} "
          f"(growth over the loaded model: {small['growth_mb']} MB -> {large['growth_mb']} MB); "
          f"{large['tiles_per_s_per_core']} tiles/s per core")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        scene, model, out, batch = sys.argv[2:6]
        print(json.dumps(child(Path(scene), Path(model), Path(out), int(batch))))
        sys.exit(0)
    sys.exit(main())
