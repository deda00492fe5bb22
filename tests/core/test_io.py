import json

import pytest
import torch

from gfm_core.errors import CheckpointError
from gfm_core.io import atomic_write, load_weights, save_weights, sha256_file, write_json


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
    assert json.loads((tmp_path / "m.json").read_text()) == {"arch": "x", "step": 3}
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
