"""House rules of the source tree (issue 13): no import cycles, small modules, short functions."""

from __future__ import annotations

import re

import pytest

from tests.helpers.house import cycles, import_graph, long_functions, modules

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
#: A module may be longer when its docstring says why, on a line of its own starting with this.
LONG_REASON = re.compile(r"^Longer than 400 lines: .+", re.M)


@pytest.fixture(scope="module")
def tree(repo_root):
    return modules(repo_root)


def test_no_import_cycles_not_even_through_function_level_imports(tree):
    assert cycles(import_graph(tree)) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    for name, body in {"a": "from pkg import b\n", "b": "def f():\n    from pkg.a import x\n"}.items():
        (tmp_path / "gfm_core" / "pkg").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gfm_core" / "pkg" / f"{name}.py").write_text(body.replace("pkg", "gfm_core.pkg"))
    (tmp_path / "orchestration").mkdir()
    assert cycles(import_graph(modules(tmp_path))) == [["gfm_core.pkg.a", "gfm_core.pkg.b"]]


def test_modules_stay_under_400_lines_or_say_why(tree):
    long = {n: m.lines for n, m in tree.items() if m.lines > MAX_MODULE_LINES and not LONG_REASON.search(m.docstring)}
    assert long == {}


def test_functions_stay_under_80_lines(tree):
    assert long_functions(tree, MAX_FUNCTION_LINES) == []
