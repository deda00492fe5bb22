"""The model card: what a user of a registered backbone needs to know, as a dict and as markdown.

Its sections follow the Hugging Face model-card template and Clay's card (model details, intended use, bands
and wavelengths, GSD, normalisation, training data hash and size, teacher, compute and CO2, evaluation,
limitations); the keys a loader reads (``architecture``, ``input_size``, ``normalisation``) stay at the top level.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfm_core.config import Params

#: Central wavelengths (um) of the RGB bands the pile holds (Sentinel-2 B04/B03/B02; aerial and Landsat RGB are
#: within a few tens of nm of them).
RGB_WAVELENGTHS_UM = {"red": 0.665, "green": 0.560, "blue": 0.490}

INTENDED_USE = (
    "A remote-sensing image encoder to fine-tune (or probe) for scene classification, multi-label classification, "
    "semantic segmentation, change detection and super-resolution, on RGB imagery at the pile's ground sample "
    "distances; features from its four stages feed gfm_core's task heads, or timm's features_only."
)
LIMITATIONS = (
    "RGB only, in the band order and [0, 1] scaling above (other bands or orders fail the band check, they are not "
    "zero-filled); GSDs outside the pile's range are untested; the evaluation table holds only the tasks named in "
    "it; a demo-preset model is a pipeline check at minutes of CPU compute, not a foundation model to deploy."
)


def model_card(backbone: Path, params: Params | None = None, metrics: Mapping[str, Any] | None = None,
               evaluation: Mapping[str, Any] | None = None) -> dict:
    """What a user of the backbone needs (module docstring), from the export's sidecar and ``summary.json``.

    With ``params``, also the pile's sources (bands, GSD ranges) and the per-band normalisation statistics of the
    pile (``<ingest.out_dir>/norm_stats.json``); ``evaluation`` is the report's table (model -> task -> score).
    """
    side = json.loads(backbone.with_suffix(".json").read_text())
    pcfg = side.get("pretrained_cfg", {})
    meta = side.get("meta", {})
    card: dict[str, Any] = {
        "architecture": side.get("arch"),
        "timm_kwargs": side.get("timm_kwargs", {}),
        "input_size": pcfg.get("input_size"),
        "normalisation": {"mean": pcfg.get("mean"), "std": pcfg.get("std"),
                          "scale": "pixels in [0, 1] (8-bit DN / 255), then (x - mean) / std"},
        "teacher": meta.get("teacher", {}),
        "data": meta.get("data", {}),
        "pretraining_steps": meta.get("steps"),
        "pretraining_loss": meta.get("loss", {}),
        "weights_sha256": side.get("weights_sha256"),
        "intended_use": INTENDED_USE,
        "wavelengths_um": dict(RGB_WAVELENGTHS_UM),
        "training_data": {"manifest_content_hash": meta.get("data", {}).get("manifest_content_hash"),
                          "images": meta.get("data", {}).get("images"), "shards": meta.get("data", {}).get("shards")},
    }
    summary = backbone.parent / "summary.json"
    if summary.is_file():  # the pretraining's compute ledger (gfm_core.training.ledger)
        ledger = json.loads(summary.read_text()).get("compute") or {}
        card["compute"] = {k: ledger.get(k) for k in ("device", "device_count", "device_hours", "wall_s", "flops",
                                                      "pool_flops", "pool_cached", "mfu", "energy_kwh",
                                                      "energy_source")}
        card["co2"] = {"kg": ledger.get("co2_kg"), "grid_gco2_per_kwh": ledger.get("grid_gco2_per_kwh"),
                       "grid_source": ledger.get("grid_source")}
    if params is not None:
        card["preset"] = params.preset or "paper"
        card["bands"] = {
            s.name: {"bands": list(s.bands) if s.bands else "all (RGB)",
                     "gsd_m": list(s.gsd_range) if s.gsd_range else "unknown"}
            for s in params.ingest.pile_sources()
        }
        stats = params.ingest.out_dir / "norm_stats.json"
        if stats.is_file():
            card["pile_norm_stats"] = json.loads(stats.read_text())
    if metrics:
        card["metrics"] = dict(metrics)
    if evaluation:
        card["evaluation"] = dict(evaluation)
    card["limitations"] = LIMITATIONS
    return card


def card_markdown(card: Mapping[str, Any], title: str = "gfm-foundation") -> str:
    """The model card as markdown (the registered version's description): the evaluation as a table, the bulky
    per-source statistics last (the registry keeps the first 5000 characters; model_card.json has them all)."""
    lines = [f"# {title}", ""]
    keys = [k for k in card if k != "pile_norm_stats"] + [k for k in card if k == "pile_norm_stats"]
    for key in keys:
        value = card[key]
        if key == "evaluation" and isinstance(value, Mapping) and "scores" in value:
            lines += [f"**{key}**", "", *_score_table(value["scores"], value.get("headlines", {})), ""]
        elif isinstance(value, Mapping):
            lines.append(f"**{key}**")
            lines += [f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
            lines.append("")
        else:
            lines.append(f"**{key}**: {value}")
            lines.append("")
    return "\n".join(lines)


def _score_table(scores: Mapping[str, Mapping[str, Any]], headlines: Mapping[str, str]) -> list[str]:
    """Markdown rows: one per model, one column per task (its headline metric)."""
    tasks = list(next(iter(scores.values()), {}))
    head = "| model | " + " | ".join(f"{t} {headlines.get(t, '')}".strip() for t in tasks) + " |"
    rows = [f"| {m} | " + " | ".join("-" if row.get(t) is None else f"{row[t]:.4g}" for t in tasks) + " |"
            for m, row in scores.items()]
    return [head, "|---|" + "---:|" * len(tasks), *rows]
