"""The contamination check over every downstream task: val and test images that sit in the pile.

A configured task is checked (its val and test images against the manifest), or explicitly excluded
(``validate.contamination_exclude``). A task whose folder is missing, whose splits cannot be listed or read, or
that yields no image fails the check with the reason: a check that compared nothing must not pass.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from gfm_core.config import TaskCfg
from gfm_core.data.ingest.manifest import DownstreamImage, contamination_check
from gfm_core.errors import GfmError

CHECKED_SPLITS = ("val", "test")
_IMAGE_KEYS = ("image", "A", "B", "lr", "hr")  # labels, masks and change maps are not pictures of the pile


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


def _images(task: TaskCfg, split: str) -> list[DownstreamImage]:
    from gfm_core.data.tasks.dataset import list_task

    found: dict[str, DownstreamImage] = {}
    for ref in list_task(task, split).refs:
        for key in _IMAGE_KEYS:
            f = ref.files.get(key)
            if isinstance(f, Path | tuple):
                found.setdefault(str(f), f)  # tiles of one file are one image
    return list(found.values())


def _check_task(table: pa.Table, task: TaskCfg) -> TaskCheck:
    from gfm_core.data.tasks.dataset import task_splits

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
