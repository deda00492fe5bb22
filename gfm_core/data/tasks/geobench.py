"""The ``geobench`` layout: GEO-Bench-2-style labelled folders (BigEarthNet v2, TreeSatAI, as in ``samples/``).

::

    <root>/classes.json            {"classes": [name, ...]}          (or TaskCfg.classes)
    <root>/labels.csv              id, split, label_idx[, label_area_fraction, ...]
    <root>/<split>/<id>.tif        one multi-band GeoTIFF per sample (splits train, val, test)

``label_idx`` holds the sample's class indexes separated by spaces; ``label_area_fraction`` (TreeSatAI) the
share of the image each of them covers, in the same order. Other columns are ignored.

The ``multilabel`` head reads every label. The ``classification`` head reads a single-label view: the label with
the largest ``label_area_fraction`` when the file has that column (TreeSatAI's dominant genus); without it only
the samples with exactly one label, the others left out (counted in ``TaskIndex.meta["left_out"]`` and logged).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from gfm_core.config import TaskCfg
from gfm_core.data.tasks.index import (
    DatasetNotFoundError,
    SampleRef,
    TaskIndex,
    check_split,
    need_dir,
    need_file,
)
from gfm_core.errors import DataValidationError

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
CLASSES_FILE = "classes.json"
REQUIRED_COLUMNS = ("id", "split", "label_idx")


def geobench_classes(cfg: TaskCfg) -> tuple[str, ...]:
    """``cfg.classes``, else the ``classes`` list of ``<root>/classes.json``.

    Raises:
        DatasetNotFoundError: neither is there.
        DataValidationError: classes.json holds no ``classes`` list.
    """
    if cfg.classes is not None:
        return tuple(cfg.classes)
    path = cfg.root / CLASSES_FILE
    if not path.is_file():
        raise DatasetNotFoundError(path, "class names", cfg, f"write it or set finetune.tasks[{cfg.name}].classes")
    try:
        classes = json.loads(path.read_text())["classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataValidationError(f"{path}: no 'classes' list of label names ({e})") from e
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataValidationError(f"{path}: 'classes' must be a list of label names")
    return tuple(classes)


def _numbers(path: Path, row: dict[str, str], column: str, kind: type[int] | type[float]) -> list:
    text = (row.get(column) or "").strip()
    try:
        return [kind(v) for v in text.split()]
    except ValueError as e:
        raise DataValidationError(
            f"{path}: row {row['id']!r}: {column} {text!r} is not space-separated numbers"
        ) from e


def _labels(path: Path, row: dict[str, str], n_classes: int) -> tuple[tuple[int, ...], list[float] | None]:
    """A row's label indexes and (when the file has them) their area fractions."""
    idx = _numbers(path, row, "label_idx", int)
    bad = [i for i in idx if not 0 <= i < n_classes]
    if bad:
        raise DataValidationError(
            f"{path}: row {row['id']!r}: label_idx {bad} outside 0..{n_classes - 1} ({n_classes} classes)"
        )
    if "label_area_fraction" not in row:
        return tuple(idx), None
    frac = _numbers(path, row, "label_area_fraction", float)
    if len(frac) != len(idx):
        raise DataValidationError(
            f"{path}: row {row['id']!r}: {len(frac)} label_area_fraction values for {len(idx)} label_idx"
        )
    return tuple(idx), frac


def read_label_rows(cfg: TaskCfg, split: str) -> list[dict[str, str]]:
    """The rows of ``<root>/labels.csv`` whose ``split`` is ``split``.

    Raises:
        DatasetNotFoundError: the file is missing.
        DataValidationError: it lacks a required column.
    """
    path = need_file(cfg.root / LABELS_FILE, "label table", cfg)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DataValidationError(
                f"{path}: missing column(s) {missing}; found {reader.fieldnames}; "
                f"the geobench layout needs {list(REQUIRED_COLUMNS)}"
            )
        return [row for row in reader if row["split"].strip() == split]


def list_geobench(cfg: TaskCfg, split: str) -> TaskIndex:
    """GEO-Bench-2-style folders: ``<split>/<id>.tif`` + ``labels.csv`` + ``classes.json`` (module docstring)."""
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    classes = geobench_classes(cfg)
    labels_csv = root / LABELS_FILE
    rows = read_label_rows(cfg, split)
    folder = need_dir(root / split, f"{split} image folder", cfg)
    refs, left_out = [], 0
    for row in rows:
        idx, frac = _labels(labels_csv, row, len(classes))
        path = folder / f"{row['id']}.tif"
        if not path.is_file():
            raise DatasetNotFoundError(path, f"image listed in {LABELS_FILE}", cfg)
        label = None
        if cfg.head == "classification":
            if frac is not None and idx:
                label = idx[max(range(len(idx)), key=frac.__getitem__)]
            elif len(idx) == 1:
                label = idx[0]
            else:
                left_out += 1
                continue
        refs.append(SampleRef(id=row["id"], files={"image": path}, label=label, labels=idx))
    if left_out:
        log.info("task %s (%s): %d of %d samples left out, not single-label", cfg.name, split, left_out, len(rows))
    if not refs:
        raise DatasetNotFoundError(
            labels_csv, f"{'single-label ' if left_out else ''}rows of split {split!r}", cfg,
            "classification reads the dominant label (label_area_fraction) or single-label rows" if left_out else "",
        )
    return TaskIndex(refs, classes, {"left_out": left_out})
