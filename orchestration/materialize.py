"""Materialise the whole asset graph, in order, into the Dagster instance the UI reads (``make demo``).

    DAGSTER_HOME=$PWD/.dagster_home python -m orchestration.materialize [--params params.yaml] [--preset demo]

Runs the jobs of :mod:`orchestration.definitions` one after the other: ``gfm_foundation`` for the data assets
(demo data -> shards), ``observe_teacher`` (so that pretraining records the teacher's sha256 as its input data
version: a new teacher then shows everything below as stale), ``gfm_foundation`` for pretraining and its
ablations, ``gfm_finetune`` once per task partition, then ``gfm_evaluate_and_promote``.
Each is a Dagster run of the instance under ``$DAGSTER_HOME`` (an ephemeral one when unset), so
``dagster dev`` shows them afterwards; all of them share one MLflow parent run (run tag ``gfm/pipeline``).
Do not run it while a ``dagster dev`` daemon is automating the same assets: both would write the same output
folders. Exit status 1 when a run fails (its error names the file or key at fault).

A run of an earlier call that was killed (``kill -9``) stays STARTED in the instance and keeps its concurrency pool
slot, which would block every later pretraining (pool ``gfm_pretrain``, limit 1): :func:`reap_dead_runs` marks such
runs failed and frees their slots first, as Dagster's run monitoring does for launched runs. Pretraining itself
then continues the killed run's last checkpoint (``gfm_core.stages.run_pretrain(resume="unfinished")``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence

import dagster as dg
from dagster._core.events import DagsterEventType

from orchestration.definitions import build_defs
from orchestration.resources import PIPELINE_TAG

DATA = ("demo_data", "geopile_manifest", "geopile_shards")
MODELS = ("foundation_model", "ablation_models")


def _run(defs: dg.Definitions, job: str, instance: dg.DagsterInstance, tags: dict[str, str], log_level: str,
         partition: str | None = None, assets: Sequence[str] | None = None) -> bool:
    label = f"{job}[{partition or ', '.join(assets or ())}]" if partition or assets else job
    print(f"[dagster] {label} ...", flush=True)
    res = defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False, tags=tags,
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )
    if not res.success:
        for event in res.get_step_failure_events():
            data = event.step_failure_data
            if data.user_failure_data:
                why = data.user_failure_data.description
            else:
                assert data.error is not None  # dagster records the error of a step that raised
                why = data.error.message
            print(f"[dagster] {label}: {event.step_key} failed: {why}", file=sys.stderr)
        return False
    for check in res.get_asset_check_evaluations():
        if not check.passed:
            level = "warning" if check.severity == dg.AssetCheckSeverity.WARN else "error"
            print(f"[dagster] {label}: {level}: check {check.check_name} on {check.asset_key.to_user_string()} "
                  f"did not pass", file=sys.stderr)
            if level == "error":  # a blocking check: what depends on it did not run
                return False
    for mat in res.get_asset_materialization_events():
        meta = mat.materialization.metadata
        assert mat.asset_key is not None  # a materialization event names its asset
        key = mat.asset_key.to_user_string()
        if key == "evaluation_report":
            arps = {k.removeprefix("arp_"): v.value for k, v in meta.items() if k.startswith("arp_")}
            print("[dagster] ARP vs the ImageNet baseline: " + ", ".join(f"{m} {v:+.2f}" for m, v in arps.items()))
        if "promoted" in meta:
            print(f"[dagster] {meta['registered'].value}: promoted={meta['promoted'].value}\n"
                  f"{meta['gate'].value}")
    print(f"[dagster] {label}: run {res.run_id} succeeded", flush=True)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark STARTED runs whose process is gone (killed) as failed and free their concurrency pool slots.

    For a single-host instance (``.dagster_home``): the process id comes from the run's start event, and a
    process that still exists (or a run without that event) is left alone. Returns the reaped run ids.
    """
    reaped: list[str] = []
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return reaped
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        starts = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
        pid = starts[0].dagster_event.pid if starts and starts[0].dagster_event else None
        if pid is None or _alive(pid):
            continue
        instance.report_run_failed(run, message=f"its process (pid {pid}) is gone (killed?): marked failed by "
                                                f"orchestration.materialize, its concurrency slots freed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        print(f"[dagster] run {run.run_id} ({run.job_name}) was killed: marked failed, pool slots freed",
              file=sys.stderr)
        reaped.append(run.run_id)
    return reaped


def main(argv: Sequence[str] | None = None) -> int:
    """Materialise every asset, one job at a time in stage order; return 1 at the first failed run, else 0."""
    p = argparse.ArgumentParser(prog="python -m orchestration.materialize", description=__doc__.splitlines()[0])
    p.add_argument("--params", default=os.environ.get("GFM_PARAMS", "params.yaml"))
    p.add_argument("--preset", default=os.environ.get("GFM_PRESET"))
    p.add_argument("--log-level", default="INFO", help="Dagster console log level (DEBUG shows every event)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    defs = build_defs(args.params, args.preset)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    reap_dead_runs(instance)
    tags = {PIPELINE_TAG: uuid.uuid4().hex}
    runs: list[tuple[str, str | None, Sequence[str] | None]] = [
        ("gfm_foundation", None, DATA), ("observe_teacher", None, None), ("gfm_foundation", None, MODELS)]
    finetune_partitions = defs.resolve_job_def("gfm_finetune").partitions_def
    assert finetune_partitions is not None  # gfm_finetune is partitioned by task
    runs += [("gfm_finetune", k, None) for k in finetune_partitions.get_partition_keys()]
    runs += [("gfm_evaluate_and_promote", None, None)]
    for job, partition, assets in runs:
        if not _run(defs, job, instance, tags, args.log_level, partition, assets):
            return 1
    where = os.environ.get("DAGSTER_HOME", "an ephemeral instance")
    print(f"[done] {len(runs)} Dagster runs in {time.perf_counter() - t0:.0f} s (instance: {where}; "
          f"UI: make ui)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
