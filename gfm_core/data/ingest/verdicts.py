"""Verdicts on the ingested pile, bound to the manifest bytes they judged.

``gfm validate`` writes two verdicts beside the manifest: ``validation/validation.json`` (great-expectations
rules) and ``contamination.json`` (downstream val/test images in the pile). Each records the sha256 of the
``manifest.parquet`` bytes it read (``manifest_sha256``) and the pile's content hash. :func:`require_verdicts`
is the one gate every consumer calls (``gfm shards``, the Dagster shards asset, the DVC ``shards`` stage): it
passes only when both verdicts exist, passed, and judged the manifest that is on disk now. A re-ingest (even a
failed one, which still rewrites the manifest and its quarantine) therefore voids both until ``gfm validate``
runs again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfm_core.errors import DataValidationError
from gfm_core.io import sha256_file

MANIFEST_NAME = "manifest.parquet"
VALIDATION_PATH = Path("validation") / "validation.json"
CONTAMINATION_PATH = Path("contamination.json")
VALIDATE_COMMAND = "gfm validate"


def verdict_paths(out_dir: str | Path) -> tuple[Path, Path]:
    """``(validation.json, contamination.json)`` of the pile ingested into ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / VALIDATION_PATH, out_dir / CONTAMINATION_PATH


def manifest_binding(manifest_sha256: str, content_hash: str) -> dict[str, str]:
    """The keys a verdict records to name the manifest it judged."""
    return {"manifest_sha256": manifest_sha256, "manifest_content_hash": content_hash}


def _read(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataValidationError(f"{path}: no {what} verdict for this pile; run `{VALIDATE_COMMAND}` first")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataValidationError(f"{path}: unreadable {what} verdict ({e}); run `{VALIDATE_COMMAND}` first") from e
    if not isinstance(raw, dict):
        raise DataValidationError(f"{path}: not a {what} verdict; run `{VALIDATE_COMMAND}` first")
    return raw


def check_verdict(path: Path, verdict: Mapping[str, Any], manifest: Path, manifest_sha256: str, what: str) -> None:
    """Raise unless ``verdict`` (read from ``path``) judged the manifest whose bytes hash to ``manifest_sha256``.

    Raises:
        DataValidationError: the verdict names no manifest or another one; the message says which command to run.
    """
    judged = verdict.get("manifest_sha256")
    if judged != manifest_sha256:
        seen = f"manifest sha256 {str(judged)[:12]}" if judged else "no manifest hash (written by an older version)"
        raise DataValidationError(
            f"{path}: stale {what} verdict: it judged {seen}, but {manifest} is now sha256 {manifest_sha256[:12]} "
            f"(re-ingested since); run `{VALIDATE_COMMAND}` first"
        )


def require_verdicts(out_dir: str | Path) -> dict[str, str]:
    """The gate before training data is built: both verdicts passed, for the manifest on disk now.

    Returns:
        :func:`manifest_binding` of the manifest the verdicts judged (its sha256 and content hash).

    Raises:
        DataValidationError: a verdict is missing, unreadable, failed, or judged other manifest bytes; the
            message names the file and the command to run.
    """
    val_path, leak_path = verdict_paths(out_dir)
    validation = _read(val_path, "validation")
    contamination = _read(leak_path, "contamination")
    manifest = Path(out_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise DataValidationError(f"{manifest}: no manifest; run `gfm ingest`, then `{VALIDATE_COMMAND}`")
    sha = sha256_file(manifest)
    check_verdict(val_path, validation, manifest, sha, "validation")
    check_verdict(leak_path, contamination, manifest, sha, "contamination")
    if not validation.get("success"):
        failed = ", ".join(str(f.get("name")) for f in validation.get("failed", []) if isinstance(f, dict))
        raise DataValidationError(
            f"{val_path}: the pile has not passed validation (failed: {failed or 'unknown'}); fix the pile, "
            f"re-ingest and run `{VALIDATE_COMMAND}` first"
        )
    if not contamination.get("success"):
        offenders = contamination.get("offenders") or []
        problems = [str(p) for p in contamination.get("problems") or []]
        if offenders:
            problems.insert(0, f"downstream test images in the pile ({len(offenders)} val/test image(s) match)")
        raise DataValidationError(
            f"{leak_path}: the contamination check failed: {'; '.join(problems) or 'no result'}; fix it and run "
            f"`{VALIDATE_COMMAND}` first"
        )
    return manifest_binding(sha, str(validation.get("manifest_content_hash", "")))
