"""The data gates through the real `gfm` CLI on generated piles: discovery, verdicts bound to the manifest
bytes they judged, and a contamination check that covers val and test of every task or fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.rasters import make_geotiff, make_photo, pattern, to_dtype
from PIL import Image

from gfm_core import cli
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
            make_photo(root / "label" / f"{split}_{i}.png", size=32, bands=1, data=np.zeros((1, 32, 32), np.uint8))
    return root


def make_ben_task(root: Path, seed: int = 700) -> Path:
    """A BigEarthNet-v1 layout task: one uint16 GeoTIFF per band (B04, B03, B02) per patch, 32 px."""
    for k, (split, n) in enumerate({"train": 1, "val": 1, "test": 2}.items()):
        lines = []
        for i in range(n):
            patch = f"S2A_{split}_{i}"
            folder = root / "BigEarthNet-v1.0" / patch
            rgb = to_dtype(pattern(3, 32, seed + 10 * k + i), "uint16")
            for b, name in enumerate(("B04", "B03", "B02")):
                make_geotiff(folder / f"{patch}_{name}.tif", data=rgb[b : b + 1])
            (folder / f"{patch}_labels_metadata.json").write_text(json.dumps({"labels": ["Pastures"]}))
            lines.append(f"{patch},S1_{patch}")
        (root / f"bigearthnet-{split}.csv").write_text("\n".join(lines) + "\n")
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
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # `gfm validate` exits 1 on a failed verdict
        code = int(e.code or 0)
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


# ------------------------------------------------------------------------------------------ defect 2


def test_gfm_shards_refuses_verdicts_that_judged_other_manifest_bytes(tmp_path, capsys):
    pile = make_pile(tmp_path / "GeoPileV0")
    params = str(write_params(tmp_path))
    out_dir = tmp_path / "out"
    validation, contamination = out_dir / "validation" / "validation.json", out_dir / "contamination.json"
    for command in ("ingest", "validate", "shards"):
        assert gfm(capsys, command, "--params", params)[0] == 0
    verdict = json.loads(contamination.read_text())
    assert verdict["success"] and len(verdict["manifest_sha256"]) == 64  # both verdicts name the bytes judged
    assert json.loads(validation.read_text())["manifest_sha256"] == verdict["manifest_sha256"]
    assert gfm(capsys, "ingest", "--params", params)[0] == 0  # the same pile again: the same bytes
    assert gfm(capsys, "shards", "--params", params)[0] == 0
    old_contamination = contamination.read_text()

    # a changed pile: the verdicts judged the previous manifest
    make_photo(pile / "drone_2024" / "orchard" / "f3.jpg", size=64, seed=99)
    assert gfm(capsys, "ingest", "--params", params)[0] == 0
    code, out = gfm(capsys, "shards", "--params", params)
    assert code == 2
    assert f"{validation}: stale validation verdict" in out and "run `gfm validate` first" in out

    # a passing validation cannot carry an old contamination verdict
    assert gfm(capsys, "validate", "--params", params)[0] == 0
    contamination.write_text(old_contamination)
    code, out = gfm(capsys, "shards", "--params", params)
    assert code == 2 and f"{contamination}: stale contamination verdict" in out

    # a failed ingest (too many bad files) rewrites the manifest before it fails: no verdict passes for it, even
    # though the accepted images, and so the content hash, are the very ones validated
    assert gfm(capsys, "validate", "--params", params)[0] == 0
    content = json.loads(validation.read_text())["manifest_content_hash"]
    for i in range(4):
        (pile / "drone_2024" / "orchard" / f"broken_{i}.tif").write_bytes(b"II*\x00 truncated")
    code, out = gfm(capsys, "ingest", "--params", params)
    assert code == 2 and "ingest.max_bad_fraction" in out
    assert pq.read_schema(out_dir / "manifest.parquet").metadata[b"gfm.content_hash"].decode() == content
    code, out = gfm(capsys, "shards", "--params", params)
    assert code == 2 and f"{validation}: stale validation verdict" in out


def test_a_validate_that_does_not_complete_leaves_no_verdict(tmp_path, capsys):
    make_pile(tmp_path / "GeoPileV0")
    params = str(write_params(tmp_path))
    for command in ("ingest", "validate"):
        assert gfm(capsys, command, "--params", params)[0] == 0
    (tmp_path / "out" / "quarantine.json").write_text("{not json")  # validation now raises
    code, out = gfm(capsys, "validate", "--params", params)
    assert code == 2 and "cannot read the quarantine file" in out
    code, out = gfm(capsys, "shards", "--params", params)
    assert code == 2 and "no validation verdict for this pile; run `gfm validate` first" in out


def test_dvc_shards_stage_depends_on_both_verdicts(repo_root):
    """DVC re-runs `gfm shards` (whose stage function holds the gate) whenever a verdict file changes, and
    `gfm validate` whenever the tasks it checks change."""
    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert spec["shards"]["cmd"] == "gfm shards"
    assert {"outputs/geopile/manifest.parquet", "outputs/geopile/validation/validation.json",
            "outputs/geopile/contamination.json"} <= set(spec["shards"]["deps"])
    assert {"finetune.tasks", "presets.demo.finetune.tasks"} <= set(spec["validate"]["params"])


# ------------------------------------------------------------------------------------------ defect 8


def test_contamination_check_compares_val_and_test_of_every_task(tmp_path, capsys):
    pile = make_pile(tmp_path / "GeoPileV0")
    change = make_change_task(tmp_path / "tasks" / "change")
    ben = make_ben_task(tmp_path / "tasks" / "ben")
    params = str(write_params(tmp_path, tasks=TASKS))
    for command in ("ingest", "validate"):
        code, out = gfm(capsys, command, "--params", params)
        assert code == 0, out
    verdict = json.loads((tmp_path / "out" / "contamination.json").read_text())
    assert verdict["tasks"]["change"]["images"] == {"val": 4, "test": 6}  # A and B of each pair
    assert verdict["tasks"]["ben"]["images"] == {"val": 1, "test": 2}  # one stack of band files each
    assert (verdict["val_images"], verdict["test_images"]) == (5, 8)
    assert "change: 4 val, 6 test; 0 in the pile" in out and "ben: 1 val, 2 test; 0 in the pile" in out

    # a val image (re-encoded, larger) and the RGB composite of a BigEarthNet test patch slip into the pile
    Image.open(change / "A" / "val_1.png").resize((64, 64), Image.Resampling.BICUBIC).save(
        pile / "drone_2024" / "orchard" / "leak_val.png")
    patch = ben / "BigEarthNet-v1.0" / "S2A_test_1"
    bands = [np.asarray(Image.open(patch / f"S2A_test_1_{b}.tif")) for b in ("B04", "B03", "B02")]
    rgb = (np.stack(bands, -1).astype(np.float64) / 10000 * 255).round().astype(np.uint8)
    Image.fromarray(rgb).resize((64, 64), Image.Resampling.BICUBIC).save(
        pile / "drone_2024" / "orchard" / "leak_ben.png")
    assert gfm(capsys, "ingest", "--params", params)[0] == 0
    code, out = gfm(capsys, "validate", "--params", params)
    assert code == 1 and "FAILED no_test_images_in_pile: 2 downstream val/test image(s)" in out
    offenders = json.loads((tmp_path / "out" / "contamination.json").read_text())["offenders"]
    assert {(o["task"], o["split"], Path(o["pile_image"]).name) for o in offenders} == {
        ("change", "val", "leak_val.png"), ("ben", "test", "leak_ben.png")}
    code, out = gfm(capsys, "shards", "--params", params)
    assert code == 2 and "downstream test images in the pile" in out


def test_a_missing_task_folder_fails_the_check_unless_excluded(tmp_path, capsys):
    make_pile(tmp_path / "GeoPileV0")
    make_change_task(tmp_path / "tasks" / "change")  # the BigEarthNet folder is not there
    params = str(write_params(tmp_path, tasks=TASKS))
    assert gfm(capsys, "ingest", "--params", params)[0] == 0
    code, out = gfm(capsys, "validate", "--params", params)
    assert code == 1
    assert f"FAILED downstream_tasks_checked: task 'ben': folder {tmp_path / 'tasks' / 'ben'} not found" in out
    assert "validate.contamination_exclude" in out
    verdict = json.loads((tmp_path / "out" / "contamination.json").read_text())
    assert not verdict["success"] and verdict["tasks"]["ben"]["status"] == "failed"
    code, out = gfm(capsys, "shards", "--params", params)
    assert code == 2 and "the contamination check failed: task 'ben': folder" in out

    params = str(write_params(tmp_path, tasks=TASKS, contamination_exclude=["ben"]))
    code, out = gfm(capsys, "validate", "--params", params)
    assert code == 0, out
    assert "ben: excluded (validate.contamination_exclude)" in out and "change: 4 val, 6 test" in out
    assert gfm(capsys, "shards", "--params", params)[0] == 0


def test_contamination_exclude_names_only_configured_tasks(tmp_path, capsys):
    params = str(write_params(tmp_path, tasks=TASKS, contamination_exclude=["bigearthnet"]))
    code, out = gfm(capsys, "validate", "--params", params)
    assert code == 2
    assert "validate.contamination_exclude: unknown task name(s) ['bigearthnet']; finetune.tasks are: change, ben" \
        in out
