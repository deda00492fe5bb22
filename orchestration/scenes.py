"""Whole scenes embedded on demand: the ``scene_embeddings`` asset, one dynamic partition per scene file.

A partition key is a scene's path relative to ``inference.scenes_dir`` (``a.tif``, ``2026/b.tif``); the asset
writes ``<inference.out_dir>/<key>.parquet`` with ``inference.model`` (:func:`gfm_core.stages.run_scene_embeddings`).
Nothing materialises it by itself (no automation condition, outside every pipeline job): ``scene_sensor`` only
adds new scene files as partitions; you pick the partitions to run in the UI (job ``embed_scenes``), or here:

    DAGSTER_HOME=$PWD/.dagster_home python -m orchestration.scenes [SCENE ...] [--params params.yaml]

which adds the scenes (default: every scene file not yet a partition) and materialises each into the instance
the UI reads. Files that disappear keep their partition (a folder unmounted for a while loses nothing); remove
one with ``instance.delete_dynamic_partition("scenes", key)``.
"""

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import dagster as dg

from gfm_core import stages
from gfm_core.config import Params
from orchestration.resources import GfmParams, MlflowTracking, stage_errors

PARTITIONS = "scenes"
SCENES = dg.DynamicPartitionsDefinition(name=PARTITIONS)


@dg.asset(partitions_def=SCENES, group_name="inference", kinds={"pytorch", "parquet"},
          description="Per-tile embeddings of one scene (GeoParquet) from inference.model; on demand only")
def scene_embeddings(context: dg.AssetExecutionContext, gfm: GfmParams, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Embed the partition's scene (:func:`gfm_core.stages.run_scene_embeddings`); report rows, speed, model."""
    with stage_errors():
        res = stages.run_scene_embeddings(mlflow.apply(gfm.load()), context.partition_key)
    context.log.info(f"{res.scene}: {res.tiles} tiles x {res.dim} in {res.seconds:.1f} s -> {res.out}")
    return dg.MaterializeResult(metadata={
        "rows": res.tiles,
        "nodata_tiles_skipped": res.skipped,
        "dim": res.dim,
        "tiles_per_second": res.tiles_per_second,
        "seconds": res.seconds,
        "model": res.model,
        "model_version": dg.MetadataValue.text(res.model_version or "(not registered)"),
        "weights_sha256": dg.MetadataValue.text(res.weights_sha256 or ""),
        "scene": dg.MetadataValue.path(str(res.scene)),
        "path": dg.MetadataValue.path(str(res.out)),
        **({"raster": dg.MetadataValue.path(str(res.raster))} if res.raster is not None else {}),
    })


embed_scenes = dg.define_asset_job("embed_scenes", selection=[scene_embeddings], partitions_def=SCENES,
                                   description="embed the chosen scene partitions (launch one, or a backfill)")


def new_scene_requests(params: Params, known: Sequence[str]) -> dg.SensorResult:
    """One ``scene_sensor`` tick: add the scene files under ``inference.scenes_dir`` that are not partitions yet."""
    have = set(known)
    new = [k for k in stages.list_scenes(params.inference) if k not in have]
    if not new:
        return dg.SensorResult(skip_reason=f"no new scene under {params.inference.scenes_dir}")
    return dg.SensorResult(dynamic_partitions_requests=[SCENES.build_add_request(new)])


def build_scene_sensor(load: Callable[[], Params]) -> dg.SensorDefinition:
    """``scene_sensor``: new scene files become ``scene_embeddings`` partitions (nothing is launched)."""

    @dg.sensor(name="scene_sensor", minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
               description="adds new files under inference.scenes_dir as scene_embeddings partitions; "
                           "materialise them on demand")
    def scene_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return new_scene_requests(load(), context.instance.get_dynamic_partitions(PARTITIONS))

    return scene_sensor


def main(argv: Sequence[str] | None = None) -> int:
    """Add scene partitions and materialise them one run each; 1 when a run fails."""
    p = argparse.ArgumentParser(prog="python -m orchestration.scenes", description=__doc__.splitlines()[0])
    p.add_argument("scenes", nargs="*", help="scene keys (paths under inference.scenes_dir); default: the new ones")
    p.add_argument("--params", default=os.environ.get("GFM_PARAMS", "params.yaml"))
    p.add_argument("--preset", default=os.environ.get("GFM_PRESET"))
    args = p.parse_args(argv)
    gfm = GfmParams(params_path=args.params, preset=args.preset)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    known = instance.get_dynamic_partitions(PARTITIONS)
    keys = list(args.scenes) or [k for k in stages.list_scenes(gfm.load().inference) if k not in known]
    instance.add_dynamic_partitions(PARTITIONS, [k for k in dict.fromkeys(keys) if k not in known])
    failed = 0
    for key in keys:
        res = dg.materialize([scene_embeddings], partition_key=key, instance=instance, raise_on_error=False,
                             resources={"gfm": gfm, "mlflow": MlflowTracking()})
        for mat in res.get_asset_materialization_events():
            meta = mat.materialization.metadata
            print(f"[dagster] {key}: {meta['rows'].value} rows, {meta['tiles_per_second'].value} tiles/s -> "
                  f"{meta['path'].value}")
        for event in res.get_step_failure_events():
            data = event.step_failure_data
            why = data.user_failure_data.description if data.user_failure_data else data.error
            print(f"[dagster] {key}: failed: {why}", file=sys.stderr)
        failed += not res.success
    if not keys:
        print("[dagster] no new scene (name scenes to embed them again)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
