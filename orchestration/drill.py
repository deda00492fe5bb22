"""The teacher upgrade drill without a running daemon: one sensor tick, its retrain runs, and what follows.

    gfm release-teacher lite2                     # the newer teacher lands in retrain.teacher_dir
    DAGSTER_HOME=$PWD/.dagster_home python -m orchestration.drill [--params params.yaml] [--preset demo]

(``make drill`` runs both.) With ``dagster dev`` running instead, its daemon ticks ``new_teacher_sensor`` every
5 minutes and the automation sensor launches the fine-tuning, evaluation and promotion; do not run both at once.

Here the sensor is evaluated by Dagster against the instance under ``$DAGSTER_HOME`` (from an empty cursor, twice,
so a completely written file counts as holding still). As the daemon does, a request whose run key (the teacher's
sha256) already has a run in the instance is dropped: a teacher is retrained on once. Each remaining request runs
the ``retrain`` job with its tags, then every fine-tuning partition and ``gfm_evaluate_and_promote``, printing
the gate's verdict and the new registry version's teacher lineage. Exit status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG

from orchestration.definitions import build_defs
from orchestration.materialize import _run, reap_dead_runs
from orchestration.resources import PIPELINE_TAG


def pending_requests(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """The ``new_teacher_sensor``'s run requests whose run key has no run in ``instance`` yet."""
    sensor = defs.get_repository_def().get_sensor_def("new_teacher_sensor")
    cursor = None
    for _ in range(2):  # the first look records the files' size and mtime; the second judges the unchanged ones
        with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
            result = sensor.evaluate_tick(context)
        cursor = result.cursor
    if result.skip_message:
        print(f"[drill] new_teacher_sensor: {result.skip_message}")
    return [r for r in result.run_requests or []
            if r.run_key and not instance.get_run_ids(dg.RunsFilter(tags={RUN_KEY_TAG: r.run_key}), limit=1)]


def run_drill(defs: dg.Definitions, instance: dg.DagsterInstance, log_level: str = "WARNING") -> list[str] | None:
    """Launch the pending retrain requests and their downstream runs; the teachers retrained on (None: a failure)."""
    done: list[str] = []
    partitions = defs.resolve_job_def("gfm_finetune").partitions_def
    assert partitions is not None  # gfm_finetune is partitioned by task
    for req in pending_requests(defs, instance):
        tags = {**req.tags, RUN_KEY_TAG: str(req.run_key), PIPELINE_TAG: uuid.uuid4().hex}
        print(f"[drill] new teacher {req.tags.get('gfm/teacher_arch')} {req.tags.get('gfm/teacher_file')} "
              f"(sha256 {req.run_key}): retrain", flush=True)
        runs = [("retrain", None), *(("gfm_finetune", k) for k in partitions.get_partition_keys()),
                ("gfm_evaluate_and_promote", None)]
        for job, partition in runs:
            if not _run(defs, job, instance, tags if job == "retrain" else {PIPELINE_TAG: tags[PIPELINE_TAG]},
                        log_level, partition):
                return None
        done.append(str(req.run_key))
        print_lineage(defs)
    return done


def print_lineage(defs: dg.Definitions) -> None:
    """The newest registry version's teacher change and verdict, as its tags record them."""
    import mlflow

    from gfm_core import tracking

    params = (defs.resources or {})["gfm"].load()  # the GfmParams resource
    tracking.configure(params.tracking)
    name = params.promote.model_name
    latest = max(mlflow.MlflowClient().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    t = latest.tags
    print(f"[drill] models:/{name}/{latest.version}: teacher {t.get('gfm.teacher')} (sha256 "
          f"{t.get('gfm.teacher_sha256')}), previous {t.get('gfm.previous_teacher')} (sha256 "
          f"{t.get('gfm.previous_teacher_sha256')}, v{t.get('gfm.previous_teacher_version')}); gate "
          f"{t.get('gfm.gate')} against v{t.get('gfm.champion_before')}: {t.get('gfm.gate_reasons')}")


def main(argv: Sequence[str] | None = None) -> int:
    """One drill: 0 when every run succeeded (also when there was no new teacher), else 1."""
    p = argparse.ArgumentParser(prog="python -m orchestration.drill", description=__doc__.splitlines()[0])
    p.add_argument("--params", default=os.environ.get("GFM_PARAMS", "params.yaml"))
    p.add_argument("--preset", default=os.environ.get("GFM_PRESET"))
    p.add_argument("--log-level", default="WARNING", help="Dagster console log level")
    args = p.parse_args(argv)
    defs = build_defs(args.params, args.preset)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    reap_dead_runs(instance)
    done = run_drill(defs, instance, args.log_level)
    if done is None:
        return 1
    print(f"[drill] {len(done)} retrain(s)" + (": see the registry's gfm.teacher / gfm.previous_teacher / "
                                                "gfm.gate_reasons tags (make mlflow-ui)" if done else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
