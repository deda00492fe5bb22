"""Every stage in order on one machine (``gfm demo``): one MLflow run with a nested run per stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from gfm_core.config import Params
from gfm_core.errors import DataValidationError
from gfm_core.stages.data import run_demo_data, run_ingest, run_shards, run_validate
from gfm_core.stages.evaluate import run_evaluate, run_promote
from gfm_core.stages.finetune import run_finetune
from gfm_core.stages.pretrain import run_pretrain


def run_demo(params: Params) -> Iterator[str]:
    """Every stage in order on the embedded default (one MLflow run, a nested run per stage)."""
    if not params.tracking.enabled:
        yield from _demo_stages(params)
        return
    from gfm_core import tracking

    tracking.configure(params.tracking)
    with tracking.stage_run("pipeline", {"preset": params.preset or "paper", "seed": params.seed}):
        yield from _demo_stages(params)
    yield f"[mlflow]    {params.tracking.uri}  (experiment {params.tracking.experiment}; " \
          f"UI: mlflow ui --backend-store-uri {params.tracking.uri})"


def _tracked(params: Params, name: str, section: Any) -> Any:
    if not params.tracking.enabled:
        import contextlib

        return contextlib.nullcontext()
    from gfm_core import tracking

    return tracking.stage_run(name, section.model_dump(mode="json") if hasattr(section, "model_dump") else section)


def _demo_stages(params: Params) -> Iterator[str]:
    t0 = time.perf_counter()
    with _tracked(params, "demo_data", params.demo_data):
        data = run_demo_data(params)
        _log(params, data.metrics(), data.artifacts())
    yield f"[demo-data] {data.root}  (pile: {sum(data.pile_counts.values())} images from {len(data.pile_counts)} "
    yield f"            sources; tasks: {', '.join(data.task_counts)}; teacher: {data.teacher})"
    with _tracked(params, "ingest", params.ingest):
        ing = run_ingest(params)
        _log(params, ing.metrics(), ing.artifacts())
    yield f"[ingest]    {ing.manifest}  ({ing.accepted} images, {ing.quarantined} quarantined, " \
          f"{ing.near_duplicates} near-duplicates; stats: {ing.stats})"
    with _tracked(params, "validate", params.validation):
        val = run_validate(params)
        _log(params, val.metrics(), val.artifacts())
    yield f"[validate]  {val.json}  ({val.n_expectations} expectations, {len(val.failed)} failed; docs: {val.docs})"
    if not val.success:
        raise DataValidationError(val.summary)
    with _tracked(params, "shards", params.ingest):
        sh = run_shards(params)
        _log(params, sh.metrics(), sh.artifacts())
    yield f"[shards]    {sh.shard_dir}  ({sh.images} images in {sh.shards} shard(s), {sh.bytes / 1e6:.1f} MB)"
    with _tracked(params, "pretrain", params.pretrain):
        pre = run_pretrain(params)
        if params.tracking.enabled:
            from gfm_core import tracking

            tracking.log_artifacts({"reconstructions": pre.reconstructions, "metrics": pre.metrics_csv,
                                    "learning": params.pretrain.out_dir / "learning.png"})
    yield f"[pretrain]  {pre.backbone}  ({pre.steps} steps on {pre.device}: {pre.summary()})"
    yield f"            metrics: {pre.metrics_csv}  reconstructions: {pre.reconstructions}"
    for name in params.finetune.ablations:
        with _tracked(params, f"pretrain_{name}", params.pretrain.ablation(name)):
            base = run_pretrain(params, name)
        yield f"[pretrain]  {base.backbone}  (ablation {name}: {base.summary()})"
    with _tracked(params, "finetune", params.finetune):
        runs = run_finetune(params)
        _log(params, {f"{r.task}.{r.model}.seed{r.seed}.{r.headline}": r.score for r in runs})
    yield f"[finetune]  {params.finetune.out_dir}  ({len(runs)} runs: {len(params.finetune.tasks)} tasks x " \
          f"{len(params.finetune.models)} models x {len(params.finetune.seeds)} seeds)"
    with _tracked(params, "evaluate", params.evaluate):
        report = run_evaluate(params)
        _log(params, {f"arp.{m}": v for m, v in report.arp.items()})
    yield f"[evaluate]  {report.paths.get('markdown')}  (ARP vs {report.baseline}: " + ", ".join(
        f"{m} {v:+.2f}" for m, v in report.arp.items()) + ")"
    yield f"            radar chart: {report.paths.get('radar')}"
    if params.tracking.enabled:
        pro = run_promote(params, report=report)
        verdict = "promoted to @" + params.promote.alias if pro.promoted else "not promoted: " + "; ".join(pro.reasons)
        yield f"[promote]   models:/{pro.model_name}/{pro.version}  ({verdict})"
    yield f"[done] in {time.perf_counter() - t0:.0f} s"


def _log(params: Params, metrics: dict[str, Any], artifacts: dict[str, Any] | None = None) -> None:
    if params.tracking.enabled:
        from gfm_core import tracking

        tracking.log_metrics(metrics)
        if artifacts:
            tracking.log_artifacts(artifacts)
