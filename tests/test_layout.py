"""Standing rules of the project layout."""

import subprocess
import sys


def test_gfm_core_never_imports_dagster(repo_root):
    code = (
        "import sys, pkgutil, importlib, gfm_core\n"
        "for m in pkgutil.walk_packages(gfm_core.__path__, 'gfm_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('dagster' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_required_top_level(repo_root):
    for name in ("pyproject.toml", "orchestration", "gfm_core", "dvc.yaml", "params.yaml", "tests", "README.md"):
        assert (repo_root / name).exists(), name


def test_readme_starts_with_the_two_commands(repo_root):
    text = (repo_root / "README.md").read_text()
    blocks = text.split("```")
    first_code = blocks[1].strip().splitlines()
    commands = [line.split("#")[0].strip() for line in first_code[1:] if line.split("#")[0].strip()]
    assert first_code[0] == "bash"
    assert commands == ["make demo", "make test"], first_code
    assert "make test" in (repo_root / ".ci" / "run").read_text()
