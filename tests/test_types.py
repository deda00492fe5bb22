"""The source tree type-checks: mypy with the ``[tool.mypy]`` settings of pyproject.toml (pydantic plugin)."""

from __future__ import annotations

from mypy import api


def test_mypy_is_clean(repo_root, monkeypatch):
    # The ``files`` in pyproject are relative to the repo root; the cache (git-ignored .cache/) keeps reruns fast.
    monkeypatch.chdir(repo_root)
    config, cache = repo_root / "pyproject.toml", repo_root / ".cache" / "mypy"
    stdout, stderr, status = api.run(["--config-file", str(config), "--cache-dir", str(cache)])
    assert status == 0, f"mypy found problems:\n{stdout}{stderr}"
