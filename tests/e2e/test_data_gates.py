"""The data gates through the real `gfm` CLI on generated piles: discovery, verdicts bound to the manifest
bytes they judged, and a contamination check that covers val and test of every task or fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.rasters import make_geotiff, make_photo
from PIL import Image

from gfm_core import cli, stages
from gfm_core.config import load_params

# folder -> (source name, sub-layout below the folder, files): GeoPile's five sources as distributed, plus one
# folder of the user's own that becomes a generic source
PILE = {
    "NAIP": ("naip", "", ["m_3807537_ne_18_1.tif", "m_3807537_nw_18_1.tif"]),
    "RSD46-WHU": ("rsd46-whu", "airport", ["a1.jpg", "a2.jpg"]),
    "MLRSNet": ("mlrsnet", "Images/bridge", ["bridge_00001.jpg", "bridge_00002.jpg"]),
    "NWPU-RESISC45": ("resisc45", "church", ["church_001.jpg", "church_002.jpg"]),
    "PatternNet": ("patternnet", "images/beach", ["beach001.jpg", "beach002.jpg"]),
    "drone_2024": ("drone_2024", "orchard", ["f1.tif", "f2.tif"]),
}


def make_pile(root: Path, seed: int = 0) -> Path:
    """GFM's GeoPileV0 layout with 64 px images: NAIP 4-band GeoTIFFs at 1 m, JPEGs, a generic 3-band folder."""
    for k, (folder, (_, sub, names)) in enumerate(PILE.items()):
        for j, name in enumerate(names):
            path = root / folder / sub / name
            s = seed + 10 * k + j
            if folder == "NAIP":
                make_geotiff(path, bands=4, size=64, seed=s, res=1.0)
            elif path.suffix == ".tif":
                make_geotiff(path, bands=3, size=64, seed=s, res=0.05)
            else:
                make_photo(path, size=64, seed=s)
    return root


def make_change_task(root: Path, seed: int = 500) -> Path:
    """A LEVIR-CD layout task: ``{A,B,label}/<split>_<n>.png``, 32 px."""
    counts = {"train": 1, "val": 2, "test": 3}
    for split, n in counts.items():
        for i in range(n):
            s = seed + 10 * list(counts).index(split) + 2 * i
            make_photo(root / "A" / f"{split}_{i}.png", size=32, seed=s)
            make_photo(root / "B" / f"{split}_{i}.png", size=32, seed=s + 1)
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "label" / f"{split}_{i}.png")
    return root


def make_ben_task(root: Path, seed: int = 700) -> Path:
    """A BigEarthNet-v1 layout task: one GeoTIFF per band (B04, B03, B02) per patch, 32 px."""
    for split, n in {"train": 1, "val": 1, "test": 2}.items():
        lines = []
        for i in range(n):
            patch = f"S2A_{split}_{i}"
            folder = root / "BigEarthNet-v1.0" / patch
            rgb = make_geotiff(root / "scratch" / f"{patch}.tif", bands=3, size=32, seed=seed + len(lines) + 5 * i
                               + {"train": 0, "val": 20, "test": 40}[split], dtype="uint16")
            with __import__("rasterio").open(rgb) as src:
                data = src.read()
            for b, name in enumerate(("B04", "B03", "B02")):
                make_geotiff(folder / f"{patch}_{name}.tif", bands=1, dtype="uint16", data=data[b : b + 1])
            (folder / f"{patch}_labels_metadata.json").write_text(json.dumps({"labels": ["Pastures"]}))
            lines.append(f"{patch},S1_{patch}")
        (root / f"bigearthnet-{split}.csv").write_text("\n".join(lines) + "\n")
    shutil.rmtree(root / "scratch")
    return root


TASKS = [
    {"name": "change", "head": "change", "layout": "levircd", "root": "tasks/change", "img_size": 32},
    {"name": "ben", "head": "multilabel", "layout": "bigearthnet", "root": "tasks/ben", "img_size": 32},
]


def write_params(tmp: Path, *, tasks: list[dict] | None = None, **validate) -> Path:
    """A params file without presets and without ``ingest.sources``: every folder of the pile is discovered."""
    raw = {
        "ingest": {"root": str(tmp / "GeoPileV0"), "out_dir": str(tmp / "out"), "max_bad_fraction": 0.2,
                   "settings": {"workers": 0, "min_size": 32}},
        "validate": {"min_size": 32, "data_docs": False, **validate},
        "finetune": {"tasks": [{**t, "root": str(tmp / t["root"])} for t in tasks or []]},
        "tracking": {"enabled": False},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def gfm(capsys, *argv: str) -> tuple[int, str]:
    """``gfm <argv>`` through the real CLI entry point: (exit code, stdout + stderr)."""
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# ------------------------------------------------------------------------------------------ defect 1


def test_gfm_ingest_discovers_the_five_geopile_sources_and_a_generic_folder(tmp_path, capsys):
    make_pile(tmp_path / "GeoPileV0")
    params = write_params(tmp_path)
    assert load_params(params).ingest.sources == ()  # the default user path: no sources listed

    code, out = gfm(capsys, "ingest", "--params", str(params))
    assert code == 0, out
    table = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(table) == 12
    assert {r["source"] for r in table} == {name for name, _, _ in PILE.values()}
    by_source = {r["source"]: r for r in table}
    assert by_source["mlrsnet"]["class_name"] == "bridge"  # MLRSNet/Images/<category>: the preset's layout
    assert by_source["patternnet"]["class_name"] == "beach"
    assert by_source["naip"]["gsd"] == pytest.approx(1.0) and by_source["naip"]["channels"] == [1, 2, 3]
    assert by_source["drone_2024"]["path"].startswith("drone_2024/orchard/")  # relative to ingest.root

    for command in ("validate", "shards"):  # the same sources serve every later reader
        code, out = gfm(capsys, command, "--params", str(params))
        assert code == 0, out
    assert json.loads((tmp_path / "out" / "shards" / "index.json").read_text())["images"] == 12
