"""Find an ingestion's candidate files: check the sources against the data root, then walk each one.

Paths are checked against the data root after resolving symlinks: folder symlinks that escape it are
quarantined and not followed, folder symlinks inside it are followed once (loop-safe). A file is a candidate
when its name matches one of its source's patterns; other files are counted as ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from gfm_core.data.ingest.quarantine import QuarantineEntry
from gfm_core.data.ingest.sources import SourceSpec
from gfm_core.errors import ConfigError

log = logging.getLogger(__name__)


def inside(path: str | Path, root: str | Path) -> bool:
    """True when ``path`` lies in (or is) ``root``, comparing the paths as given."""
    return Path(path).is_relative_to(root)


def resolve_sources(
    data_root: Path, sources: Sequence[SourceSpec], out_dir: Path
) -> list[tuple[SourceSpec, Path]]:
    """Each source with its real root folder.

    Raises:
        ConfigError: no sources, repeated names, a root outside ``data_root`` or missing, ``out_dir`` inside
            a source, or two sources that overlap.
    """
    if not sources:
        raise ConfigError("no GeoPile sources given (use discover_geopile(data_root) or get_preset(name))")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"source names must be unique; repeated: {dupes}")
    out_real = Path(os.path.realpath(out_dir))
    resolved: list[tuple[SourceSpec, Path]] = []
    for spec in sources:
        root = data_root / spec.root
        real = Path(os.path.realpath(root))
        if not inside(real, data_root):
            raise ConfigError(
                f"source {spec.name!r}: root {spec.root} resolves outside the data root ({real})"
            )
        if not real.is_dir():
            raise ConfigError(f"source {spec.name!r}: folder {root} not found (check the source's root)")
        if inside(out_real, real):
            raise ConfigError(
                f"out_dir {out_dir} lies inside source {spec.name!r} ({root}); its outputs would be ingested "
                f"next time: choose an out_dir outside the sources"
            )
        resolved.append((spec, real))
    for a, ra in resolved:
        for b, rb in resolved:
            if a.name < b.name and (inside(ra, rb) or inside(rb, ra)):
                raise ConfigError(
                    f"sources {a.name!r} and {b.name!r} overlap ({ra} and {rb}); each file is seen twice"
                )
    return resolved


def walk_source(
    data_root: Path, spec: SourceSpec, skip_hidden: bool
) -> tuple[list[tuple[str, str]], list[QuarantineEntry], int]:
    """One source's candidate files ``(absolute path, relative path)``, folder quarantine, ignored count."""
    patterns = tuple(p.lower() for p in spec.patterns)
    start = data_root / spec.root
    files: list[tuple[str, str]] = []
    bad: list[QuarantineEntry] = []
    ignored = 0
    visited = {os.path.realpath(start)}
    stack: list[tuple[str, PurePosixPath]] = [(str(start), PurePosixPath(spec.root))]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            bad.append(
                QuarantineEntry(
                    str(rel), spec.name, f"cannot list the folder ({e.strerror}); nothing in it was ingested"
                )
            )
            continue
        subdirs: list[tuple[str, PurePosixPath]] = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            erel = rel / entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(entry.path)
                if entry.is_symlink() and not inside(real, data_root):
                    bad.append(
                        QuarantineEntry(
                            str(erel),
                            spec.name,
                            f"folder symlink resolves outside the data root (-> {real}); not followed",
                        )
                    )
                elif real not in visited:
                    visited.add(real)
                    subdirs.append((entry.path, erel))
                else:
                    log.info("%s: folder already walked through another path (%s); skipped", erel, real)
            elif any(fnmatch(entry.name.lower(), p) for p in patterns):
                files.append((entry.path, str(erel)))
            else:
                ignored += 1
        stack.extend(reversed(subdirs))
    return files, bad, ignored
