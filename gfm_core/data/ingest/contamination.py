"""The contamination check over every downstream task: val and test images that sit in the pile.

A configured task is checked (its val and test images against the manifest), or explicitly excluded
(``validate.contamination_exclude``). A task whose folder is missing, whose splits cannot be listed or read, or
that yields no image fails the check with the reason: a check that compared nothing must not pass.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from gfm_core.config import TaskCfg
from gfm_core.data.ingest.dedup import hamming_join, perceptual_hash
from gfm_core.data.ingest.manifest import read_manifest
from gfm_core.data.raster.header import DEFAULT_MAX_PIXELS
from gfm_core.data.raster.reader import RasterImage, read_image
from gfm_core.data.tasks.layouts import list_task, task_splits
from gfm_core.errors import GfmError
from gfm_core.io import sha256_file

CHECKED_SPLITS = ("val", "test")
_IMAGE_KEYS = ("image", "A", "B", "lr", "hr")  # labels, masks and change maps are not pictures of the pile

DownstreamImage = str | Path | tuple[str | Path, ...]
"""A downstream image: one file, or one file per band (BigEarthNet, OSCD), composed in the given order."""


@dataclass(frozen=True)
class Offender:
    """A downstream test image found in the pile.

    Attributes:
        test_path: the test image.
        pile_path: the manifest row it matches.
        kind: ``exact`` (same sha256) or ``near`` (perceptual hash within ``distance`` bits).
        distance: Hamming distance of the perceptual hashes (0 for exact copies).
    """

    test_path: str
    pile_path: str
    kind: Literal["exact", "near"]
    distance: int


@dataclass(frozen=True)
class TaskCheck:
    """One task's part of the check.

    Attributes:
        task: the ``finetune.tasks`` name.
        root: its folder.
        status: ``checked``, ``excluded`` (``validate.contamination_exclude``), or ``failed`` (see ``problem``).
        images: image files compared per split (a per-band stack counts once).
        offenders: ``{"split", "test_image", "pile_image", "kind", "distance"}`` per match.
        problem: why the task could not be checked.
    """

    task: str
    root: str
    status: Literal["checked", "excluded", "failed"]
    images: dict[str, int] = field(default_factory=dict)
    offenders: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


@dataclass(frozen=True)
class ContaminationReport:
    """Every task's check against one manifest."""

    tasks: tuple[TaskCheck, ...]

    @property
    def offenders(self) -> list[dict[str, Any]]:
        """Every match, with its task."""
        return [{"task": t.task, **o} for t in self.tasks for o in t.offenders]

    @property
    def problems(self) -> list[str]:
        """Why tasks could not be checked."""
        return [f"task {t.task!r}: {t.problem}" for t in self.tasks if t.status == "failed"]

    @property
    def success(self) -> bool:
        """Every task checked or excluded, and no downstream image in the pile."""
        return not self.problems and not self.offenders

    def counts(self, split: str) -> int:
        """Images compared in ``split`` over all tasks."""
        return sum(t.images.get(split, 0) for t in self.tasks)

    def to_json(self) -> dict[str, Any]:
        """The ``contamination.json`` body (without the manifest binding)."""
        return {
            "success": self.success,
            "test_images": self.counts("test"),
            "val_images": self.counts("val"),
            "tasks": {t.task: {k: v for k, v in asdict(t).items() if k != "task"} for t in self.tasks},
            "problems": self.problems,
            "offenders": self.offenders,
        }

    def summary(self) -> str:
        """One line of counts per task, for ``gfm validate``'s summary."""
        head = (f"contamination check: {self.counts('test')} test + {self.counts('val')} val image(s) of "
                f"{sum(t.status == 'checked' for t in self.tasks)} task(s) compared with the pile")
        lines = [head]
        for t in self.tasks:
            if t.status == "checked":
                split = ", ".join(f"{n} {s}" for s, n in t.images.items())
                lines.append(f"  {t.task}: {split}; {len(t.offenders)} in the pile")
            elif t.status == "excluded":
                lines.append(f"  {t.task}: excluded (validate.contamination_exclude)")
            else:
                lines.append(f"  {t.task}: NOT CHECKED: {t.problem}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one image set


def _read_test_image(item: DownstreamImage, bands: Sequence[int] | None, value_range: tuple[float, float] | None,
                     max_pixels: int) -> RasterImage:
    """One test image; per-band files are read one band each and resized to the first file's grid."""
    kw: dict[str, Any] = dict(value_range=value_range, min_size=2, max_pixels=max_pixels, allow_nonfinite=True)
    if not isinstance(item, tuple):
        return read_image(item, bands=bands, **kw)
    parts = [read_image(f, bands=(1,), **kw) for f in item[:3]]  # the hash averages the first three bands
    h, w = parts[0].array.shape[1:]
    planes, valid = [], parts[0].valid
    for part in parts:
        plane = part.array[0]
        if plane.shape != (h, w):
            plane = np.asarray(Image.fromarray(plane, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        planes.append(plane)
    return replace(parts[0], array=np.stack(planes).astype(np.float32), valid=valid,
                   bands=tuple(range(1, len(planes) + 1)))


def image_label(item: DownstreamImage) -> str:
    """How a test image is named in reports (per-band files: the files joined by ``+``)."""
    return "+".join(str(f) for f in item) if isinstance(item, tuple) else str(item)


def contamination_check(
    manifest: str | Path | pa.Table,
    test_images: Iterable[DownstreamImage],
    *,
    max_hamming: int = 8,
    bands: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Offender]:
    """Downstream test images that sit in the pile, as exact copies or perceptual near-duplicates.

    Args:
        manifest: a manifest path or table from :func:`~gfm_core.data.ingest.manifest.build_manifest`.
        test_images: the downstream test images (any format :func:`~gfm_core.data.raster.reader.read_image`
            reads); a tuple is one image stored as one file per band (hashed as their composite; each file's
            sha256 is compared too).
        max_hamming: perceptual-hash distance (of 64 bits) at or under which an image counts as the same
            picture (re-encoded, rescaled, slightly recoloured). Unrelated images are rarely under ~10.
        bands: bands of the test images to hash (the hash averages the first three: RGB and BGR agree).
        value_range: scaling of the test images (the hash is insensitive to brightness scaling).
        max_pixels: largest test image accepted, in samples.

    Returns:
        Offenders sorted by test path, then distance, then pile path; empty when the pile is clean.

    Raises:
        RasterReadError: a test image cannot be read (a check that skipped it could pass wrongly).
        DataValidationError: the manifest cannot be read.
    """
    table = read_manifest(manifest)
    pile_paths = table.column("path").to_pylist()
    pile_sha = table.column("sha256").to_pylist()
    pile_hash = np.array([int(h, 16) for h in table.column("phash").to_pylist()], dtype=np.uint64)
    by_sha: dict[str, list[str]] = {}
    for p, s in zip(pile_paths, pile_sha, strict=True):
        by_sha.setdefault(s, []).append(p)

    items = list(test_images)
    tests = [image_label(t) for t in items]
    offenders: set[Offender] = set()
    test_hash = np.zeros(len(tests), dtype=np.uint64)
    for k, item in enumerate(items):
        test_hash[k] = perceptual_hash(_read_test_image(item, bands, value_range, max_pixels))
        for f in item if isinstance(item, tuple) else (item,):
            for p in by_sha.get(sha256_file(f), []):
                offenders.add(Offender(tests[k], p, "exact", 0))
    exact_pairs = {(o.test_path, o.pile_path) for o in offenders}
    i, j, d = hamming_join(test_hash, pile_hash, max_hamming)
    for a, b, dist in zip(i.tolist(), j.tolist(), d.tolist(), strict=True):
        if (tests[a], pile_paths[b]) not in exact_pairs:
            offenders.add(Offender(tests[a], pile_paths[b], "near", dist))
    return sorted(offenders, key=lambda o: (o.test_path, o.distance, o.pile_path))


# ------------------------------------------------------------------------------------------------ every task


def _images(task: TaskCfg, split: str) -> list[DownstreamImage]:
    found: dict[str, DownstreamImage] = {}
    for ref in list_task(task, split).refs:
        for key in _IMAGE_KEYS:
            f = ref.files.get(key)
            if isinstance(f, Path | tuple):
                found.setdefault(str(f), f)  # tiles of one file are one image
    return list(found.values())


def _check_task(table: pa.Table, task: TaskCfg) -> TaskCheck:
    root = str(task.root)
    if not Path(task.root).is_dir():
        return TaskCheck(task.name, root, "failed", problem=(
            f"folder {task.root} not found; put the task's data there, or list {task.name!r} in "
            f"validate.contamination_exclude to leave it out of the check"))
    counts: dict[str, int] = {}
    offenders: list[dict[str, Any]] = []
    try:
        for split in (s for s in CHECKED_SPLITS if s in task_splits(task)):
            files = _images(task, split)
            counts[split] = len(files)
            for o in contamination_check(table, files, bands=task.bands, value_range=task.value_range):
                offenders.append({"split": split, "test_image": o.test_path, "pile_image": o.pile_path,
                                  "kind": o.kind, "distance": o.distance})
    except GfmError as e:  # a split that cannot be listed or an unreadable image: the task is not checked
        return TaskCheck(task.name, root, "failed", counts, offenders, problem=str(e))
    if not sum(counts.values()):
        return TaskCheck(task.name, root, "failed", counts, problem=f"no val/test image found under {root}")
    return TaskCheck(task.name, root, "checked", counts, offenders)


def check_tasks(table: pa.Table, tasks: Sequence[TaskCfg], exclude: Collection[str] = ()) -> ContaminationReport:
    """Check the val and test images of every task not in ``exclude`` against the manifest ``table``."""
    return ContaminationReport(tuple(
        TaskCheck(t.name, str(t.root), "excluded") if t.name in exclude else _check_task(table, t) for t in tasks
    ))
