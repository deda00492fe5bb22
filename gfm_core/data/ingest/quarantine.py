"""The quarantine of an ingestion: files left out of the pile, why, and optional copies for inspection.

Files are recorded in ``quarantine.json`` (beside the manifest), never moved, deleted or rewritten. With
``IngestSettings.quarantine_copy`` a copy of each quarantined regular file inside the data root also goes to
``<out_dir>/quarantine/<relative path>``; that folder carries a marker file and is replaced on every run.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gfm_core.errors import ConfigError
from gfm_core.io import durable_replace, make_temp_dir

log = logging.getLogger(__name__)

QUARANTINE_NAME = "quarantine.json"
QUARANTINE_DIR = "quarantine"
_QUARANTINE_MARKER = ".gfm-quarantine"


@dataclass(frozen=True)
class QuarantineEntry:
    """A file (or folder) left out of the pile, and why. ``copy`` is its copy under ``out_dir``, if made."""

    path: str
    source: str
    reason: str
    copy: str | None = None


def copy_quarantined(
    data_root: Path, out_dir: Path, entries: list[QuarantineEntry]
) -> list[QuarantineEntry]:
    """Copy quarantined regular files under the data root to ``<out_dir>/quarantine/`` (fresh each run)."""
    final = out_dir / QUARANTINE_DIR
    tmp = make_temp_dir(final)
    try:
        out = _copy_into(data_root, tmp, entries)
        remove_own_quarantine(final)
        durable_replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_into(data_root: Path, tmp: Path, entries: list[QuarantineEntry]) -> list[QuarantineEntry]:
    (tmp / _QUARANTINE_MARKER).write_text(
        "copies made by gfm_core.data.ingest.manifest.build_manifest; safe to delete\n"
    )
    out = []
    for e in entries:
        src = data_root / e.path
        real = os.path.realpath(src)
        copy = None
        if os.path.isfile(src) and Path(real).is_relative_to(data_root):
            dst = tmp / e.path
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                copy = str(PurePosixPath(QUARANTINE_DIR) / e.path)
            except OSError as err:
                log.warning("%s: could not copy into the quarantine folder (%s)", e.path, err)
        out.append(QuarantineEntry(e.path, e.source, e.reason, copy))
    return out


def check_own_quarantine(folder: Path) -> None:
    """Refuse to touch a ``quarantine/`` folder that :func:`copy_quarantined` did not make.

    Raises:
        ConfigError: the folder exists without the marker file.
    """
    if folder.exists() and not (folder / _QUARANTINE_MARKER).is_file():
        raise ConfigError(
            f"{folder} exists but was not made by build_manifest; move it away or pick another out_dir"
        )


def remove_own_quarantine(folder: Path) -> None:
    """Delete the ``quarantine/`` copies of an earlier run (after :func:`check_own_quarantine`)."""
    check_own_quarantine(folder)
    if folder.exists():
        shutil.rmtree(folder)
