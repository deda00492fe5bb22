"""Retraining triggers: a cron schedule, and a sensor that notices new ImageNet teachers.

The sensor watches two places:

- ``retrain.teacher_dir``: each checkpoint whose sha256 it has not seen (and that is not already the teacher in
  force) gets exactly one run of the retraining job, with run key = the sha256 (Dagster never launches a run
  key twice) and the tags ``gfm/teacher_file``, ``gfm/teacher_arch``, ``gfm/teacher_sha256``, which the
  pretraining assets read to pretrain on that teacher. Fine-tuning, evaluation and promotion follow by their
  automation conditions.
- timm's pretrained list (``retrain.timm_patterns``): names that appear after a timm upgrade are announced (the
  tick's skip reason and the run log) and remembered. Nothing is downloaded: put the weights in the teacher
  folder (named ``<timm name>.safetensors``) and the folder branch launches the run. ``gfm release-teacher
  lite1|lite2`` does that for the packaged EfficientNet-Lite teachers (:mod:`gfm_core.registry.release`);
  ``make drill`` then evaluates this sensor once and runs what it asks for, without a daemon
  (:mod:`orchestration.drill`).

A checkpoint counts only once its size and mtime are the same on two consecutive ticks, so a file still being
copied into the folder never triggers a run (nor is its partial hash remembered as seen).

The cursor is JSON: ``{"sha256": [seen hashes], "files": {path: [size, mtime_ns]}, "timm": {"version": ...,
"names": [...]}}``; the first tick records timm's list without announcing it. A plain JSON list (an older
cursor) is read as the seen hashes.
"""


import json
from collections.abc import Callable
from typing import Any

import dagster as dg

from gfm_core.config import Params
from gfm_core.io import sha256_file
from gfm_core.registry import scan_teachers, teacher_stats, timm_teachers
from gfm_core.registry.teachers import champion_teacher
from orchestration.resources import TEACHER_ARCH_TAG, TEACHER_FILE_TAG, TEACHER_SHA_TAG


def read_cursor(cursor: str | None) -> dict[str, Any]:
    """The sensor's cursor as ``{"sha256": [...], "timm": {...} | None}``."""
    if not cursor:
        return {"sha256": [], "files": {}, "timm": None}
    raw = json.loads(cursor)
    if isinstance(raw, list):
        return {"sha256": raw, "files": {}, "timm": None}
    return {"sha256": list(raw.get("sha256", [])), "files": dict(raw.get("files", {})), "timm": raw.get("timm")}


def timm_patterns(params: Params) -> tuple[str, ...]:
    """``retrain.timm_patterns``, or the teacher's own arch family when unset."""
    pats = params.retrain.timm_patterns
    return (f"{params.pretrain.teacher.arch}*",) if pats is None else tuple(pats)


def evaluate_teachers(params: Params, cursor: str | None) -> dg.SensorResult:
    """One sensor tick: run requests for new teacher files, announcements for new timm names, the new cursor."""
    state = read_cursor(cursor)
    seen = set(state["sha256"])
    in_force = params.pretrain.teacher.checkpoint
    if in_force is not None and in_force.is_file():
        seen.add(sha256_file(in_force))  # the teacher the current model was trained on is not news
    folder, patterns = params.retrain.teacher_dir, params.retrain.teacher_patterns
    now = teacher_stats(folder, patterns)
    found = scan_teachers(folder, patterns, stable=state["files"])  # unchanged since the previous tick
    settling = sorted(p for p, st in now.items() if state["files"].get(p) != st)
    requests = []
    for sha, t in sorted(found.items()):
        if sha in seen:
            continue
        tags = {TEACHER_SHA_TAG: sha, TEACHER_FILE_TAG: str(t.path)}
        if t.arch:
            tags[TEACHER_ARCH_TAG] = t.arch
        requests.append(dg.RunRequest(run_key=sha, tags=tags))
    new_cursor: dict[str, Any] = {"sha256": sorted(set(state["sha256"]) | set(found)), "files": now,
                                  "timm": state["timm"]}

    announced: list[str] = []
    patterns = timm_patterns(params)
    if patterns:
        version, names = timm_teachers(patterns)
        if state["timm"] is not None:
            announced = sorted(set(names) - set(state["timm"].get("names", [])))
        new_cursor["timm"] = {"version": version, "names": names}
    text = json.dumps(new_cursor, sort_keys=True)
    if requests:
        return dg.SensorResult(run_requests=requests, cursor=text)
    skip = (f"new ImageNet weights in timm {new_cursor['timm']['version']}: {', '.join(announced)}; put a "
            f"checkpoint named <name>.safetensors into {params.retrain.teacher_dir} to retrain on it"
            if announced else f"no new teacher in {params.retrain.teacher_dir}")
    if settling:
        skip += f"; waiting for {len(settling)} file(s) to stop changing: {', '.join(settling)}"
    return dg.SensorResult(skip_reason=skip, cursor=text)


def build_teacher_sensor(load_params: Callable[[], Params], job: Any) -> dg.SensorDefinition:
    """The ``new_teacher_sensor`` of ``job`` (the params are read on every tick, so edits apply)."""

    @dg.sensor(job=job, minimum_interval_seconds=300, name="new_teacher_sensor",
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="a new ImageNet teacher: a checkpoint in retrain.teacher_dir, or new timm weights")
    def new_teacher_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        result = evaluate_teachers(load_params(), context.cursor)
        for r in result.run_requests or []:
            context.log.info(f"new teacher {r.tags[TEACHER_FILE_TAG]} (sha256 {r.run_key}): retraining")
        if result.skip_reason and "timm" in str(result.skip_reason):
            context.log.info(str(result.skip_reason))
        return result

    return new_teacher_sensor


def champion_teacher_tags(params: Params) -> dict[str, str]:
    """Run tags that pretrain on the champion's teacher when a teacher upgrade was promoted (a released file in
    ``retrain.teacher_dir``, not the params' teacher); empty: the params' teacher."""
    from gfm_core import tracking

    tracking.configure(params.tracking)
    t = champion_teacher(params.promote.model_name, params.promote.alias, params.retrain.teacher_dir,
                         params.retrain.teacher_patterns, params.pretrain.teacher.checkpoint)
    if t is None:
        return {}
    return {TEACHER_SHA_TAG: t.sha256, TEACHER_FILE_TAG: str(t.path), **({TEACHER_ARCH_TAG: t.arch} if t.arch else {})}


def build_retrain_schedule(params: Params, load_params: Callable[[], Params], job: Any) -> dg.ScheduleDefinition:
    """Retraining on ``retrain.cron`` (UTC), on the champion's teacher (:func:`champion_teacher_tags`)."""

    @dg.schedule(job=job, cron_schedule=params.retrain.cron, name="retrain_schedule", execution_timezone="UTC",
                 description="periodic retraining (retrain.cron) on the champion's teacher; stopped until switched on")
    def retrain_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        tags = champion_teacher_tags(load_params())
        if tags:
            context.log.info(f"retraining on the champion's teacher {tags[TEACHER_FILE_TAG]}")
        return dg.RunRequest(tags=tags)

    return retrain_schedule
