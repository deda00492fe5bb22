"""Every stage in order on one machine (``gfm demo``): one MLflow run with a nested run per stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from gfm_core.config import Params
from gfm_core.errors import DataValidationError
from gfm_core.stages import stage
from gfm_core.stages.data import run_demo_data, run_ingest, run_shards, run_validate
from gfm_core.stages.evaluate import run_evaluate, run_promote
from gfm_core.stages.finetune import log_runs, run_finetune
from gfm_core.stages.pretrain import run_pretrain


def run_demo(params: Params) -> Iterator[str]:
    """Every stage in order on the embedded default (one MLflow run, a nested run per stage)."""
    if not params.tracking.enabled:
        yield from _demo_stages(params)
        return
    from gfm_core import tracking

    tracking.configure(params.tracking)
    sets = {"sets": " ".join(params.sets)} if params.sets else {}  # -S overrides, as typed
    with tracking.stage_run("pipeline", {"preset": params.preset or "paper", "seed": params.seed, **sets}):
        yield from _demo_stages(params)
    yield f"[mlflow]    {params.tracking.uri}  (experiment {params.tracking.experiment}; " \
          f"UI: mlflow ui --backend-store-uri {params.tracking.uri})"


def _tracked(params: Params, name: str, run_name: str | None = None, section: Any = None) -> Any:
    """The MLflow stage run of stage ``name`` (named ``run_name``, default ``name``), recording its params section."""
    if not params.tracking.enabled:
        return contextlib.nullcontext()
    from gfm_core import tracking

    section = section if section is not None else getattr(params, stage(name).section)
    return tracking.stage_run(run_name or name, section.model_dump(mode="json"))


def _log(params: Params, result: Any) -> None:
    """A stage result's metrics and files into the active stage run (the names the Dagster assets log)."""
    if params.tracking.enabled:
        from gfm_core import tracking

        tracking.log_metrics(result.tracked_metrics())
        tracking.log_artifacts(result.tracked_files())


def _data_stages(params: Params) -> Iterator[str]:
    with _tracked(params, "demo_data"):
        data = run_demo_data(params)
        _log(params, data)
    yield f"[demo-data] {data.root}  (pile: {sum(data.pile_counts.values())} images from {len(data.pile_counts)} "
    yield f"            sources; tasks: {', '.join(data.task_counts)}; teacher: {data.teacher})"
    with _tracked(params, "ingest"):
        ing = run_ingest(params)
        _log(params, ing)
    yield f"[ingest]    {ing.manifest}  ({ing.accepted} images, {ing.quarantined} quarantined, " \
          f"{ing.near_duplicates} near-duplicates; stats: {ing.stats})"
    with _tracked(params, "validate"):
        val = run_validate(params)
        _log(params, val)
    yield f"[validate]  {val.json}  ({val.n_expectations} expectations, {len(val.failed)} failed; docs: {val.docs})"
    if not val.success:
        raise DataValidationError(val.summary)
    with _tracked(params, "shards"):
        sh = run_shards(params)
        _log(params, sh)
    yield f"[shards]    {sh.shard_dir}  ({sh.images} images in {sh.shards} shard(s), {sh.bytes / 1e6:.1f} MB)"


def _model_stages(params: Params) -> Iterator[str]:
    with _tracked(params, "pretrain"):
        pre = run_pretrain(params)
        _log(params, pre)
    yield f"[pretrain]  {pre.backbone}  ({pre.steps} steps on {pre.device}: {pre.summary()})"
    yield f"            metrics: {pre.metrics_csv}  reconstructions: {pre.reconstructions}"
    for name in params.finetune.ablations:
        with _tracked(params, "pretrain", f"pretrain_{name}", params.pretrain.ablation(name)):
            base = run_pretrain(params, name)
            _log(params, base)
        yield f"[pretrain]  {base.backbone}  (ablation {name}: {base.summary()})"
    runs = []
    for task in params.finetune.tasks:  # one stage run per task, as the Dagster partitions
        with _tracked(params, "finetune", f"finetune_{task.name}"):
            task_runs = run_finetune(params, tasks=[task.name])
            if params.tracking.enabled:
                log_runs(task_runs)
        runs += task_runs
    yield f"[finetune]  {params.finetune.out_dir}  ({len(runs)} runs: {len(params.finetune.tasks)} tasks x " \
          f"{len(params.finetune.models)} models x {len(params.finetune.seeds)} seeds)"


def _report_stages(params: Params) -> Iterator[str]:
    with _tracked(params, "evaluate"):
        report = run_evaluate(params)
        _log(params, report)
    yield f"[evaluate]  {report.paths.get('markdown')}  (ARP vs {report.baseline}: " + ", ".join(
        f"{m} {v:+.2f}" for m, v in report.arp.items()) + ")"
    yield f"            radar chart: {report.paths.get('radar')}"
    if params.tracking.enabled:
        with _tracked(params, "promote"):
            pro = run_promote(params, report=report)
            _log(params, pro)
        verdict = "promoted to @" + params.promote.alias if pro.promoted else "not promoted: " + "; ".join(pro.reasons)
        yield f"[promote]   models:/{pro.model_name}/{pro.version}  ({verdict})"


def _demo_stages(params: Params) -> Iterator[str]:
    t0 = time.perf_counter()
    yield from _data_stages(params)
    yield from _model_stages(params)
    yield from _report_stages(params)
    yield f"[done] in {time.perf_counter() - t0:.0f} s"
