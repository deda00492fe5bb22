"""What every task layout shares: the sample references of a split, and the checks that name a missing path.

A layout (:mod:`~gfm_core.data.tasks.layouts`) lists a split as :class:`SampleRef` items (files, label, tile
window) in a :class:`TaskIndex`; :class:`~gfm_core.data.tasks.dataset.TaskDataset` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfm_core.config import TaskCfg
from gfm_core.errors import ConfigError, DataValidationError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class DatasetNotFoundError(DataValidationError, FileNotFoundError):
    """A task's folder, split list or file is missing; the message names the path and the fix."""

    def __init__(self, path: str | Path, what: str, cfg: TaskCfg | None = None, fix: str = "") -> None:
        where = f" (task {cfg.name!r}, layout {cfg.layout!r}, root {cfg.root})" if cfg is not None else ""
        hint = fix or "check finetune.tasks[].root and the layout; nothing is downloaded"
        super().__init__(f"{path}: {what} not found{where}; {hint}")
        self.path = Path(path)


@dataclass(frozen=True)
class SampleRef:
    """One sample before reading: its files, its label, an optional tile window.

    ``label`` is a class id (classification); ``labels`` the class ids of a multi-label sample when the layout
    lists them (``geobench``'s labels.csv).
    """

    id: str
    files: dict[str, Path | tuple[Path, ...]]
    label: int | None = None
    window: tuple[int, int, int, int] | None = None  # col_off, row_off, width, height (label/HR grid)
    labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TaskIndex:
    """A split of a task: its samples and label names (empty for change/superres)."""

    refs: list[SampleRef]
    classes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


def need_dir(path: Path, what: str, cfg: TaskCfg) -> Path:
    """``path`` if it is a folder.

    Raises:
        DatasetNotFoundError: it is not.
    """
    if not path.is_dir():
        raise DatasetNotFoundError(path, what, cfg)
    return path


def need_file(path: Path, what: str, cfg: TaskCfg) -> Path:
    """``path`` if it is a file.

    Raises:
        DatasetNotFoundError: it is not.
    """
    if not path.is_file():
        raise DatasetNotFoundError(path, what, cfg)
    return path


def split_lines(path: Path, cfg: TaskCfg) -> list[str]:
    """The non-blank lines of a split list (one sample a line)."""
    need_file(path, "split list", cfg)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``img2`` before ``img10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def class_folder_index(base: Path, cfg: TaskCfg) -> tuple[tuple[str, ...], dict[str, tuple[Path, int]]]:
    """``base/<class>/<file>`` -> sorted class names and ``{file name: (path, class index)}``."""
    need_dir(base, "image folder", cfg)
    classes = tuple(sorted(d.name for d in base.iterdir() if d.is_dir()))
    if not classes:
        raise DatasetNotFoundError(base, "class subfolders", cfg)
    index: dict[str, tuple[Path, int]] = {}
    for i, c in enumerate(classes):
        for f in (base / c).iterdir():
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                index[f.name] = (f, i)
    return classes, index


def check_split(cfg: TaskCfg, split: str, valid: Sequence[str] = SPLITS) -> None:
    """Refuse a split the layout does not have.

    Raises:
        ConfigError: naming the valid splits.
    """
    if split not in valid:
        raise ConfigError(
            f"task {cfg.name!r} ({cfg.layout}): unknown split {split!r}; valid: {', '.join(valid)}"
        )
