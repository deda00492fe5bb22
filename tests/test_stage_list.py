"""One stage list (gfm_core.stages.STAGES): dvc.yaml, the Dagster definitions and gfm demo follow it."""

from __future__ import annotations

import ast
import itertools

import yaml

from gfm_core.config import load_params
from gfm_core.stages import STAGES, stage
from orchestration.definitions import build_defs
from tests.orchestration.dagster_params import write_params


def test_dvc_runs_the_stages_in_order_under_their_names(repo_root):
    names = list((yaml.safe_load((repo_root / "dvc.yaml").read_text()) or {})["stages"])
    assert names == [s.name for s in STAGES if s.dvc]
    params = load_params(repo_root / "params.yaml")
    for s in STAGES:  # each stage's MLflow run records a section that exists
        assert getattr(params, s.section) is not None


def test_every_stage_has_its_dagster_asset_in_order(repo_root, tmp_path):
    defs = build_defs(str(write_params(repo_root, tmp_path)))
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    checks = {c.name for c in graph.asset_check_keys}
    order = [s.asset for s in STAGES if s.asset in keys]
    assert [s.asset for s in STAGES if s.asset not in keys] == ["great_expectations_suite"]
    assert "great_expectations_suite" in checks
    upstream = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
                for k in graph.get_all_asset_keys()}

    def ancestors(a: str) -> set[str]:
        return set().union(*({p} | ancestors(p) for p in upstream.get(a, set()))) if upstream.get(a) else set()

    for before, after in itertools.pairwise(order):
        assert before in ancestors(after), (before, after)


def test_gfm_demo_opens_a_run_per_stage_of_the_list(repo_root):
    """The pipeline names its MLflow stage runs only through the list (no free-standing names)."""
    tree = ast.parse((repo_root / "gfm_core" / "stages" / "pipeline.py").read_text())
    calls = sorted((c.lineno, c.args[1].value) for c in ast.walk(tree) if isinstance(c, ast.Call)
                   and getattr(c.func, "id", "") == "_tracked" and isinstance(c.args[1], ast.Constant))
    named = list(dict.fromkeys(name for _, name in calls))  # in source order (the ablations reuse "pretrain")
    assert named == [s.name for s in STAGES]
    # the Dagster assets name their MLflow runs through the same list (MlflowTracking.stage looks names up)
    tree = ast.parse((repo_root / "orchestration" / "assets.py").read_text())
    calls = sorted((c.lineno, c.args[2].value) for c in ast.walk(tree) if isinstance(c, ast.Call)
                   and getattr(c.func, "attr", "") == "stage" and isinstance(c.args[2], ast.Constant))
    assert list(dict.fromkeys(name for _, name in calls)) == [s.name for s in STAGES]
    assert stage("validate").section == "validation"


def test_dvc_deps_cover_the_code_each_stage_runs(repo_root):
    """A change to any module a stage imports (even inside a function) invalidates that stage's DVC cache."""
    from gfm_core import stages
    from tests.helpers.house import closure, import_graph, modules

    mods = modules(repo_root)
    graph = import_graph(mods)
    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for s in STAGES:
        if not s.dvc:
            continue
        deps = [d.rstrip("/") for d in spec[s.name].get("do", spec[s.name])["deps"]]
        entry = f"gfm_core.stages.{stages._HOMES[f'run_{s.name}']}"
        files = sorted(str(mods[m].path.relative_to(repo_root)) for m in closure(graph, entry))
        uncovered = [f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)]
        assert uncovered == [], f"dvc.yaml stage {s.name}: add deps for {uncovered}"
