"""The model card: what a user of a registered backbone needs to know, as a dict and as markdown."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfm_core.config import Params


def model_card(backbone: Path, params: Params | None = None, metrics: Mapping[str, Any] | None = None) -> dict:
    """What a user of the backbone needs: architecture, input, bands, GSD, normalisation, lineage, metrics.

    From the export's sidecar; with ``params``, also the pile's sources (bands, GSD ranges) and the per-band
    normalisation statistics of the pile (``<ingest.out_dir>/norm_stats.json``).
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
    }
    if params is not None:
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
    return card


def card_markdown(card: Mapping[str, Any], title: str = "gfm-foundation") -> str:
    """The model card as markdown (the registered version's description)."""
    lines = [f"# {title}", ""]
    for key, value in card.items():
        if isinstance(value, Mapping):
            lines.append(f"**{key}**")
            lines += [f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
            lines.append("")
        else:
            lines.append(f"**{key}**: {value}")
            lines.append("")
    return "\n".join(lines)
