"""``-S key=value`` overrides: the syntax of ``dvc exp run -S``, validated like params.yaml, recorded in Params."""

import pytest

from gfm_core import cli
from gfm_core.config import load_params, parse_params
from gfm_core.config.sets import apply_sets, parse_set
from gfm_core.errors import ConfigError


def test_values_are_yaml_and_keys_dotted():
    assert parse_set("finetune.epochs=5") == (["finetune", "epochs"], 5)
    assert parse_set("finetune.seeds=[0, 1]") == (["finetune", "seeds"], [0, 1])
    assert parse_set("pretrain.teacher.checkpoint=null") == (["pretrain", "teacher", "checkpoint"], None)
    assert parse_set("tracking.uri=sqlite:///x.db") == (["tracking", "uri"], "sqlite:///x.db")
    for bad in ("finetune.epochs", "=5", "finetune..epochs=5"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_set(bad)


def test_lists_by_index_and_by_name():
    raw = {"finetune": {"seeds": [0, 1], "tasks": [{"name": "scene", "epochs": 9}, {"name": "seg"}]}}
    out = apply_sets(raw, ["finetune.seeds.1=7", "finetune.tasks.scene.epochs=3", "finetune.tasks.1.epochs=4"])
    assert out["finetune"]["seeds"] == [0, 7]
    assert [t.get("epochs") for t in out["finetune"]["tasks"]] == [3, 4]
    assert raw["finetune"]["seeds"] == [0, 1]  # the input is not changed
    with pytest.raises(ConfigError, match=r"no element named 'sr'.*scene"):
        apply_sets(raw, ["finetune.tasks.sr.epochs=3"])
    with pytest.raises(ConfigError, match="no index 5"):
        apply_sets(raw, ["finetune.seeds.5=1"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_sets(raw, ["finetune.seeds.0.x=1"])


def test_sets_win_over_the_preset_are_validated_and_recorded(repo_root):
    params = load_params(repo_root / "params.yaml", sets=["finetune.epochs=30", "finetune.tasks.0.epochs=2"])
    assert params.preset == "demo" and params.finetune.epochs == 30 and params.finetune.tasks[0].epochs == 2
    assert params.sets == ("finetune.epochs=30", "finetune.tasks.0.epochs=2")
    with pytest.raises(ConfigError, match=r"finetune\.epochz: unknown key"):
        load_params(repo_root / "params.yaml", sets=["finetune.epochz=3"])
    with pytest.raises(ConfigError, match=r"finetune\.epochs"):
        load_params(repo_root / "params.yaml", sets=["finetune.epochs=many"])
    again = parse_params(params.model_dump(mode="json", by_alias=True), preset="")  # a dump keeps its record
    assert again.sets == params.sets and again.finetune.epochs == 30


def test_every_subcommand_takes_S(tmp_path, capsys):
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        args = parser.parse_args([name, "-S", "seed=3", "--set", "finetune.epochs=2"])
        assert args.set == ["seed=3", "finetune.epochs=2"]
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: 0\n")
    assert cli.main(["evaluate", "--params", str(bad), "-S", "finetune.epochz=1"]) == 2
    assert "finetune.epochz: unknown key" in capsys.readouterr().err
