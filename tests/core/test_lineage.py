"""DVC lineage of a backbone: tagged only when dvc.lock records that very file."""

import hashlib

import pytest
import yaml

from gfm_core.errors import ConfigError
from gfm_core.io import sha256_file
from gfm_core.stages import dvc_lineage


def _lock(tmp_path, md5):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "ingest": {"cmd": "gfm ingest", "outs": [{"path": "outputs/geopile", "md5": "x.dir"}]},
        "pretrain": {"cmd": "gfm pretrain", "outs": [
            {"path": "outputs/pretrain/backbone.json", "md5": "0" * 32},
            {"path": "outputs/pretrain/backbone.safetensors", "md5": md5, "size": 5},
        ]},
    }}))
    return lock


def test_a_backbone_recorded_in_dvc_lock_gets_its_stage_and_lock_hash(tmp_path):
    backbone = tmp_path / "outputs" / "pretrain" / "backbone.safetensors"
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(b"12345")
    lock = _lock(tmp_path, hashlib.md5(b"12345").hexdigest())
    assert dvc_lineage(backbone, lock) == {"gfm.dvc_lock_sha256": sha256_file(lock), "gfm.dvc_stage": "pretrain"}

    backbone.write_bytes(b"retrained outside dvc")  # the file changed since `dvc repro`: no DVC lineage
    assert dvc_lineage(backbone, lock) == {}
    assert dvc_lineage(backbone, tmp_path / "missing.lock") == {}


def test_an_unreadable_lock_names_the_file(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("stages: [unclosed")
    with pytest.raises(ConfigError, match=r"dvc\.lock: not a readable dvc\.lock"):
        dvc_lineage(tmp_path / "b.safetensors", lock)
