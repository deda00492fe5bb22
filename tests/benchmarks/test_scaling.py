"""benchmarks/scaling.py: the projection's arithmetic on hand-computed cases, and the table from a results JSON."""

import json
import sys

import pytest


@pytest.fixture
def scaling(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root))
    monkeypatch.delitem(sys.modules, "benchmarks.scaling", raising=False)
    from benchmarks import scaling

    return scaling


def test_projection_by_hand(scaling):
    # 2 devices x 0.5 efficiency x 4 images / 1 s = 4 images/s; 3600 images x 10 epochs / 4 = 9000 s = 2.5 h
    p = scaling.project(1.0, 4, 2, 0.5, images=3600, epochs=10)
    assert (p.images_per_s, p.wall_hours, p.device_hours, p.efficiency) == (4.0, 2.5, 5.0, 0.5)
    # one device ignores the efficiency: 8 images / 2 s = 4 images/s; GeoPile x 100 = 58,795,400 images
    one = scaling.project(2.0, 8, 1, 0.5)
    assert one.images_per_s == 4.0 and one.efficiency == 1.0
    assert one.wall_hours == pytest.approx(587_954 * 100 / 4 / 3600) == pytest.approx(4083.0139, abs=1e-4)
    # 64 devices at 0.9: 64 x 0.9 x 4 = 230.4 images/s; device-hours = wall x 64 = one device's / 0.9
    many = scaling.project(2.0, 8, 64, 0.9)
    assert many.images_per_s == pytest.approx(230.4)
    assert many.device_hours == pytest.approx(one.device_hours / 0.9)


@pytest.mark.parametrize("kwargs", [dict(step_s=0.0), dict(batch=0), dict(devices=0), dict(efficiency=1.5)])
def test_projection_rejects_impossible_inputs(scaling, kwargs):
    args = dict(step_s=1.0, batch=4, devices=2, efficiency=0.5) | kwargs
    with pytest.raises(ValueError):
        scaling.project(**args)


def test_table_from_a_results_json(scaling, tmp_path, capsys):
    run = {
        "geometry": "paper",
        "batch": 8,
        "device": "cpu",
        "device_name": "test cpu",
        "threads": 1,
        "candidate": {"step_s_median": 2.0},
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "dp.json").write_text(json.dumps({"efficiency": 0.9}))
    rows = scaling.main(["project", "--results", str(tmp_path / "run.json"), "--dp", str(tmp_path / "dp.json")])
    assert [r["devices"] for r in rows] == [1, 8, 64]
    assert rows[1]["images_per_s"] == pytest.approx(8 * 0.9 * 4)
    out = capsys.readouterr().out
    assert "| 1 | 1.00 | 4.0 | 4,083.0 | 4,083 |" in out
    assert "| 64 | 0.90 | 230.4 |" in out and "| 93.3 |" in out
