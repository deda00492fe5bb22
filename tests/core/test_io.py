import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from helpers.rasters import make_geotiff
from helpers.registry import tiny_backbone

from gfm_core.data.ingest.manifest import build_manifest
from gfm_core.data.ingest.sources import IngestSettings, folder_source
from gfm_core.errors import CheckpointError
from gfm_core.io import atomic_write, load_weights, save_weights, sha256_file, write_json
from gfm_core.models.weights import load_backbone


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"{half")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp litter


def test_safetensors_roundtrip_with_sidecar(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.arange(3.0)}
    path = save_weights(tmp_path / "m.safetensors", sd, meta={"arch": "x", "step": 3})
    back = load_weights(path)
    assert set(back) == {"w", "b"} and torch.equal(back["w"], sd["w"])
    side = json.loads((tmp_path / "m.json").read_text())
    assert side == {"arch": "x", "step": 3, "weights_sha256": sha256_file(path)}
    assert len(sha256_file(path)) == 64


def test_legacy_pth_unwrapped_and_weights_only(tmp_path):
    p = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.ones(2)}}, p)
    assert torch.equal(load_weights(p)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, bad)
    with pytest.raises(CheckpointError, match=r"evil\.pth: cannot load weights"):
        load_weights(bad)


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_weights(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: cannot load weights"):
        load_weights(bad)


def test_weights_that_are_not_the_sidecars_are_refused_on_load(tmp_path):
    good, _ = tiny_backbone(tmp_path, seed=0)
    other, _ = tiny_backbone(tmp_path, seed=1)
    load_backbone(good)  # a matching pair loads
    shutil.copy(other, good)  # the weights of another write beside this sidecar (a crash between the two)
    with pytest.raises(CheckpointError, match=r"backbone\.safetensors: sha256 .* is not the weights_sha256 .*"
                       r"re-export the weights / re-run pretraining"):
        load_backbone(good)
    side = json.loads(other.with_suffix(".json").read_text())
    del side["weights_sha256"]
    other.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match=r"backbone\.json: no weights_sha256 .*re-run pretraining"):
        load_backbone(other)

    plain = save_weights(tmp_path / "t.safetensors", {"w": torch.ones(2)}, meta={"arch": "x"})
    save_weights(tmp_path / "u.safetensors", {"w": torch.zeros(2)})
    shutil.copy(tmp_path / "u.safetensors", plain)
    with pytest.raises(CheckpointError, match=r"t\.safetensors: sha256 .* t\.json"):
        load_weights(plain)


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # the real call, recorded with what it flushed
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json(tmp_path / "report.json", {"v": 1})
    assert events == ["fsync file", "rename", "fsync dir"]


WRITER = """
import os, signal, sys
from gfm_core.io import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"partial")
    f.flush()
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    sys.stdin.readline()
"""


def _temps(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def test_temps_of_a_killed_writer_are_cleaned_by_the_next_writer_of_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", WRITER, str(out / "manifest.parquet"), "kill"])
    assert killed.returncode == -signal.SIGKILL
    assert len(_temps(out, "manifest.parquet")) == 1  # the orphan a kill -9 leaves
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(out / "norm_stats.json"), "wait"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline() == "writing\n"
        (live_temp,) = _temps(out, "norm_stats.json")

        make_geotiff(tmp_path / "pile" / "a" / "x.tif", size=32)
        build_manifest(tmp_path / "pile", [folder_source("a", "a")], out, settings=IngestSettings(workers=0,
                       min_size=16), progress=False)
        assert _temps(out, "manifest.parquet") == []  # the killed writer's temp is gone
        assert _temps(out, "norm_stats.json") == [live_temp]  # a live writer's is not touched
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0 and (out / "norm_stats.json").read_bytes() == b"partial"
    assert _temps(out, "norm_stats.json") == []
