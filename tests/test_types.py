"""The source tree type-checks: mypy with the ``[tool.mypy]`` settings of pyproject.toml (pydantic plugin)."""

from __future__ import annotations

import subprocess
import sys


def test_mypy_is_clean(repo_root):
    # A subprocess, as the CLI: mypy's in-process API leaves ~1.6 GB to free at exit (30-45 s on 2 cores).
    # The cache (git-ignored .cache/mypy) keeps reruns to seconds.
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--cache-dir", ".cache/mypy"],
        cwd=repo_root, capture_output=True, text=True,
    )
    assert out.returncode == 0, f"mypy found problems:\n{out.stdout}{out.stderr}"
