"""Dagster resources: the params file, MLflow tracking, and how pretraining is launched. No ML code here.

All three are typed and swappable in ``Definitions(resources=...)`` (or per test): ``GfmParams`` names the
params file; ``MlflowTracking`` overrides ``tracking.uri``/``experiment`` and gives every asset an MLflow stage
run under one parent run per Dagster run; ``PretrainLauncher`` runs pretraining in this process (the demo) or
as a ``torchrun``/``deepspeed`` job through Dagster Pipes, with the same result for the asset either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from gfm_core import stages
from gfm_core.config import Params, load_params, teacher_overrides
from gfm_core.errors import GfmError

#: Run tags a retraining run carries (set by the teacher sensor): the teacher to pretrain with.
TEACHER_FILE_TAG = "gfm/teacher_file"
TEACHER_ARCH_TAG = "gfm/teacher_arch"
TEACHER_SHA_TAG = "gfm/teacher_sha256"
#: Run tag grouping several Dagster runs under one MLflow parent run (``orchestration.materialize`` sets it).
PIPELINE_TAG = "gfm/pipeline"


class GfmParams(dg.ConfigurableResource):
    """``params.yaml`` and the preset in force (None = the file's own ``preset`` key, '' = the paper's values).

    ``teacher_checkpoint``/``teacher_arch`` override ``pretrain.teacher`` (a retraining run on a new teacher).
    """

    params_path: str = "params.yaml"
    preset: str | None = None
    teacher_checkpoint: str | None = None
    teacher_arch: str | None = None

    def load(self) -> Params:
        """The validated params (a bad key fails here, naming the file and the key)."""
        return load_params(self.params_path, preset=self.preset,
                           overrides=teacher_overrides(self.teacher_checkpoint, self.teacher_arch))

    def for_run(self, tags: Mapping[str, str]) -> GfmParams:
        """This resource with the teacher a run's tags name (``gfm/teacher_file``, ``gfm/teacher_arch``)."""
        if TEACHER_FILE_TAG not in tags and TEACHER_ARCH_TAG not in tags:
            return self
        return GfmParams(
            params_path=self.params_path, preset=self.preset,
            teacher_checkpoint=tags.get(TEACHER_FILE_TAG, self.teacher_checkpoint),
            teacher_arch=tags.get(TEACHER_ARCH_TAG, self.teacher_arch),
        )


class MlflowTracking(dg.ConfigurableResource):
    """MLflow for the assets: one parent run per Dagster run (or per ``gfm/pipeline`` run tag), a nested run per
    asset (and partition).

    ``tracking_uri``/``experiment`` override params' ``tracking`` section (None = keep it); ``ui_url`` is where
    run links point when the store is local (``mlflow ui ... -p 5000``); a server URI links to itself.
    """

    tracking_uri: str | None = None
    experiment: str | None = None
    ui_url: str | None = "http://127.0.0.1:5000"

    def apply(self, params: Params) -> Params:
        """``params`` with this resource's tracking overrides."""
        update = {k: v for k, v in (("uri", self.tracking_uri), ("experiment", self.experiment)) if v is not None}
        if not update:
            return params
        return params.model_copy(update={"tracking": params.tracking.model_copy(update=update)})

    @contextlib.contextmanager
    def stage(
        self, context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, params: Params, name: str,
        run_name: str | None = None, section: Any = None,
    ) -> Iterator[str | None]:
        """The Dagster run's parent MLflow run and, nested in it, the run of stage ``name`` (a name of
        :data:`gfm_core.stages.STAGES`; ``run_name`` for a partition or an ablation) recording its params section
        (or ``section``), as ``gfm demo`` names them; yields the stage run id.

        Yields None when ``tracking.enabled`` is false.
        """
        section = section if section is not None else getattr(params, stages.stage(name).section)
        if not params.tracking.enabled:
            yield None
            return
        from gfm_core import tracking

        tracking.configure(params.tracking)
        run_id, job = context.run.run_id, context.run.job_name
        tags = {"dagster.run_id": run_id, "dagster.job": job}
        key = context.run.tags.get(PIPELINE_TAG)
        title = f"dagster pipeline {key[:8]}" if key else f"dagster {job} {run_id[:8]}"
        with tracking.pipeline_run(key or run_id, title, {} if key else tags):
            asset_key = (context.check_specs[0].asset_key if isinstance(context, dg.AssetCheckExecutionContext)
                         else context.asset_key)
            stage_tags = {**tags, "dagster.asset": asset_key.to_user_string()}
            if context.has_partition_key:
                stage_tags["dagster.partition"] = context.partition_key
            dump = section.model_dump(mode="json") if hasattr(section, "model_dump") else dict(section or {})
            with tracking.stage_run(run_name or name, dump, stage_tags) as stage_run_id:
                yield stage_run_id

    def links(self, run_id: str | None) -> dict[str, Any]:
        """Metadata entries pointing at an MLflow run (empty when untracked)."""
        if run_id is None:
            return {}
        from gfm_core import tracking

        url = tracking.run_url(run_id, self.ui_url)
        return {"mlflow_run_id": run_id, **({"mlflow_run": dg.MetadataValue.url(url)} if url else {})}


@dataclass(frozen=True)
class LaunchResult:
    """What a pretraining launch produced, whichever launcher ran it."""

    backbone: Path
    summary: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)  # logged steps: {"step": ..., metrics...}


class _DagsterLog:
    """``fit`` callback for in-process runs: each logged step as a line in the Dagster run's log."""

    def __init__(self, context: dg.AssetExecutionContext) -> None:
        self.context = context

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.context.log.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


class PretrainLauncher(dg.ConfigurableResource):
    """Runs pretraining: in this process (the demo), or as a job through Dagster Pipes.

    ``subprocess`` runs one Python process; ``torchrun``/``deepspeed`` run ``nproc_per_node`` ranks on this
    node (``extra_args`` go to the launcher: ``--nnodes``/``--rdzv_endpoint``, or ``--hostfile`` for
    multi-node). Logs and per-step metrics stream back (Dagster log lines, Pipes messages, and the asset's
    MLflow run); the asset code is the same for every mode.
    """

    mode: Literal["in_process", "subprocess", "torchrun", "deepspeed"] = "in_process"
    nproc_per_node: int = 1
    extra_args: list[str] = Field(default_factory=list, description="launcher flags (multi-node, hostfile)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the launched job")

    def callbacks(self, context: dg.AssetExecutionContext) -> list[Any]:
        """``fit`` callbacks of an in-process run: each logged step as a Dagster log line."""
        return [_DagsterLog(context)]

    def command(self, gfm: GfmParams, ablation: str | None = None) -> list[str]:
        """The launcher command line for ``mode`` (not used in process)."""
        cli = ["-m", "orchestration.pipes_pretrain", "--params", gfm.params_path]
        if gfm.preset is not None:
            cli += ["--preset", gfm.preset]
        if ablation:
            cli += ["--ablation", ablation]
        if gfm.teacher_checkpoint:
            cli += ["--teacher-checkpoint", gfm.teacher_checkpoint]
        if gfm.teacher_arch:
            cli += ["--teacher-arch", gfm.teacher_arch]
        bin_dir = Path(sys.executable).parent
        if self.mode == "subprocess":
            return [sys.executable, *cli]
        if self.mode == "torchrun":
            return [str(bin_dir / "torchrun"), f"--nproc_per_node={self.nproc_per_node}", *self.extra_args, *cli]
        ds = [str(bin_dir / "deepspeed"), f"--num_gpus={self.nproc_per_node}", *self.extra_args, "--no_local_rank",
              "--module"]
        return [*ds, *cli[1:]]

    def pretrain(
        self, context: dg.AssetExecutionContext, gfm: GfmParams, ablation: str | None = None,
        *, mlflow_run_id: str | None = None, params: Params | None = None,
    ) -> LaunchResult:
        """Run one pretraining (the foundation model, or one of ``pretrain.ablations``).

        Args:
            mlflow_run_id: the asset's MLflow stage run; a launched job resumes it for its per-step metrics.
            params: the params in force (``gfm.load()`` with the tracking overrides); default ``gfm.load()``.
        """
        params = params or gfm.load()
        cfg = params.pretrain.ablation(ablation) if ablation else params.pretrain
        if self.mode == "in_process":
            # a re-materialisation continues an interrupted run of the same fingerprint, else starts fresh
            kw: dict[str, Any] = {"resume": "unfinished", "callbacks": self.callbacks(context)}
            res = stages.run_pretrain(params, ablation, **kw)
            return LaunchResult(res.backbone, json.loads(res.summary_json.read_text()), list(res.history))
        cmd = self.command(gfm, ablation)
        context.log.info("launching through Dagster Pipes: %s", " ".join(cmd))
        extras: dict[str, Any] = {}
        if mlflow_run_id is not None:
            extras = {"mlflow_run_id": mlflow_run_id, "tracking_uri": params.tracking.uri}
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **self.env}
        # a non-zero exit raises Dagster's "External execution process failed with code N"; the job's own
        # stdout/stderr (with the gfm_core error naming the file or key) are in the step's compute logs
        done = dg.PipesSubprocessClient().run(command=cmd, context=context, extras=extras, env=env)
        messages = done.get_custom_messages()
        history = [{"step": m["step"], **m["metrics"]} for m in messages if isinstance(m, dict) and "step" in m]
        results = [m["result"] for m in messages if isinstance(m, dict) and "result" in m]
        summary_path = cfg.out_dir / "summary.json"
        if not results or not summary_path.is_file():
            raise dg.Failure(description=f"pretraining job ended without a result ({summary_path} missing): "
                                         f"{' '.join(cmd)}")
        return LaunchResult(Path(results[-1]["backbone"]), json.loads(summary_path.read_text()), history)


@contextlib.contextmanager
def stage_errors() -> Iterator[None]:
    """Turn a gfm_core error into a Dagster failure whose description is the message (file or key at fault)."""
    try:
        yield
    except GfmError as e:
        raise dg.Failure(description=f"{type(e).__name__}: {e}", metadata={"error": str(e)}) from e
