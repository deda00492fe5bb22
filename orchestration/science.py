"""The science experiment as a Dagster asset (job ``gfm_science``): the same stage function as ``make science``."""

import json

import dagster as dg

from gfm_core.config import load_params
from orchestration.assets import _image, demo_data
from orchestration.resources import GfmParams, stage_errors


class ScienceConfig(dg.Config):
    """Which preset of the params file the experiment runs with."""

    preset: str = "science"


@dg.asset(deps=[demo_data], group_name="science", kinds={"pytorch"},
          description="The paper's claims tested at small scale: variants x seeds, dense probes, verdicts")
def science_report(context: dg.AssetExecutionContext, config: ScienceConfig, gfm: GfmParams) -> dg.MaterializeResult:
    """Run the science experiment with the ``config.preset`` preset; report the verdicts."""
    from gfm_core.science.experiment import run_science  # torch loads in the run, not with the definitions

    with stage_errors():
        params = load_params(gfm.params_path, preset=config.preset)
        res = run_science(params, progress=context.log.info)
    report = json.loads(res.report_json.read_text())
    verdicts = {f"{h} {s}": v for h, sets in res.verdicts.items() for s, v in sets.items()}
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(res.report_md.read_text()),
        "report_json": dg.MetadataValue.path(str(res.report_json)),
        **{k: dg.MetadataValue.text(v) for k, v in verdicts.items()},
        "wall_seconds": float(report["wall_seconds"]["total"]),
        **_image("curve", res.report_json.parent / "curve.png"),
    })


science_job = dg.define_asset_job("gfm_science", selection=[science_report],
                                  description="make science: pile, pretraining variants, probes, report")
