"""The data stages: demo data, ingestion (manifest, quarantine, statistics), validation (great-expectations
rules and the contamination check, each verdict bound to the manifest bytes it judged) and training shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfm_core.config import Params
from gfm_core.errors import DataValidationError
from gfm_core.io import write_json

TEACHER_FILE = "tf_efficientnet_lite0.safetensors"


# ------------------------------------------------------------------------------------------------ demo data


@dataclass(frozen=True)
class DemoDataStageResult:
    """Demo data plus the demo teacher's weight file."""

    root: Path
    teacher: Path
    pile_counts: dict[str, int]
    task_counts: dict[str, dict[str, int]]

    def tracked_metrics(self) -> dict[str, float]:
        """What the stage logs (MLflow, Dagster): the same names whoever runs it."""
        return {"pile_images": sum(self.pile_counts.values())}

    def tracked_files(self) -> dict[str, Path]:
        """The files the stage's tracked run keeps."""
        return {"manifest": self.root / "manifest.json"}


def demo_under(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``raw`` params (``params.yaml`` as parsed YAML) with the demo's data, pile outputs, teacher and task folders
    under ``folder``: a scratch copy of the demo for tests and benchmarks. Edits ``raw`` and returns it."""
    raw["demo_data"]["root"] = str(folder / "demo")
    demo = raw["presets"]["demo"]
    demo["ingest"].update(root=str(folder / "demo" / "pile"), out_dir=str(folder / "geopile"))
    demo["pretrain"]["teacher"]["checkpoint"] = str(folder / "demo" / "teacher" / TEACHER_FILE)
    for task in demo["finetune"]["tasks"]:  # the contamination check reads every task's test split
        task["root"] = str(folder / "demo" / "tasks" / task["name"])
    return raw


def run_demo_data(params: Params) -> DemoDataStageResult:
    """Build the embedded demo GeoPile and tasks, and export the real ImageNet demo teacher next to them."""
    from gfm_core.demo.build import build_demo_data
    from gfm_core.models.imagenet_weights import export_efficientnet_lite0

    res = build_demo_data(params.demo_data)
    teacher = export_efficientnet_lite0(params.demo_data.root / "teacher" / TEACHER_FILE)
    return DemoDataStageResult(
        root=res.root, teacher=teacher, pile_counts=dict(res.pile_counts), task_counts=dict(res.task_counts)
    )


# ------------------------------------------------------------------------------------------------ ingestion


@dataclass(frozen=True)
class IngestResult:
    """The pile's manifest, quarantine report and normalisation statistics."""

    manifest: Path
    quarantine: Path
    stats: Path
    content_hash: str
    accepted: int
    quarantined: int
    near_duplicates: int
    bad_fraction: float
    per_source: dict[str, dict[str, int]]

    def tracked_metrics(self) -> dict[str, float]:
        """What the stage logs (MLflow, Dagster): the same names whoever runs it."""
        return {"accepted": self.accepted, "quarantined": self.quarantined, "quarantine_rate": self.bad_fraction,
                "near_duplicates": self.near_duplicates}

    def tracked_files(self) -> dict[str, Path]:
        """The files the stage's tracked run keeps."""
        return {"quarantine": self.quarantine, "stats": self.stats}


def run_ingest(params: Params, *, progress: bool = True) -> IngestResult:
    """Read every image of the pile once: manifest, quarantine report (bad files never stop it), stats.

    Raises:
        DataValidationError: more than ``ingest.max_bad_fraction`` of the files were quarantined.
    """
    from gfm_core.data.ingest.manifest import build_manifest
    from gfm_core.data.ingest.stats import compute_norm_stats, write_norm_stats

    cfg = params.ingest
    report = build_manifest(
        cfg.root, params.ingest.pile_sources(), cfg.out_dir, settings=cfg.settings, progress=progress
    )
    norm = compute_norm_stats(report.manifest_path, stretch_percentiles=cfg.stretch, data_root=cfg.root)
    stats = write_norm_stats(norm, cfg.out_dir / "norm_stats.json")
    write_json(cfg.out_dir / "ingest_summary.json", {
        "accepted": report.accepted, "quarantined": report.quarantined, "bad_fraction": report.bad_fraction,
        "near_duplicates": report.near_duplicates, "content_hash": report.content_hash,
    })
    result = IngestResult(
        manifest=report.manifest_path, quarantine=report.quarantine_path, stats=stats,
        content_hash=report.content_hash, accepted=report.accepted, quarantined=report.quarantined,
        near_duplicates=report.near_duplicates, bad_fraction=report.bad_fraction,
        per_source={k: dict(v) for k, v in report.per_source.items()},
    )
    if report.bad_fraction > cfg.max_bad_fraction:
        worst = "; ".join(f"{e.path}: {e.reason}" for e in report.entries[:5])
        raise DataValidationError(
            f"{report.quarantine_path}: {report.quarantined} of {report.candidates} files quarantined "
            f"({report.bad_fraction:.1%} > ingest.max_bad_fraction {cfg.max_bad_fraction:.1%}); first: {worst}"
        )
    return result


def run_contamination_check(params: Params, table: Any, manifest_sha256: str) -> Any:
    """Val and test images of every downstream task checked against the manifest; ``contamination.json``.

    ``table`` is the manifest parsed from the bytes whose sha256 is ``manifest_sha256`` (the verdict's binding).
    Returns the :class:`~gfm_core.data.ingest.contamination.ContaminationReport`.
    """
    from gfm_core.data.ingest.contamination import check_tasks
    from gfm_core.data.ingest.verdicts import manifest_binding, verdict_paths

    report = check_tasks(table, params.finetune.tasks, params.validation.contamination_exclude)
    content = table.schema.metadata.get(b"gfm.content_hash", b"").decode() if table.schema.metadata else ""
    write_json(verdict_paths(params.ingest.out_dir)[1],
               {**manifest_binding(manifest_sha256, content), **report.to_json()})
    return report


@dataclass(frozen=True)
class ValidateResult:
    """Great-expectations verdict on the ingested pile."""

    success: bool
    n_expectations: int
    failed: tuple[str, ...]
    json: Path
    docs: Path | None
    summary: str

    def tracked_metrics(self) -> dict[str, float]:
        """What the stage logs (MLflow, Dagster): the same names whoever runs it."""
        return {"passed": float(self.success), "failed_expectations": len(self.failed)}

    def tracked_files(self) -> dict[str, Path]:
        """The files the stage's tracked run keeps."""
        return {"results": self.json}


def run_validate(params: Params) -> ValidateResult:
    """Check the manifest against the ``validate`` rules and the downstream tasks (a failed rule is a result).

    Both verdicts (``validation.json``, ``contamination.json``) are removed first and written only when their
    check completes, each bound to the manifest bytes it read (:mod:`gfm_core.data.ingest.verdicts`).
    """
    from gfm_core.data.ingest.manifest import load_manifest
    from gfm_core.data.ingest.validation import validate_manifest
    from gfm_core.data.ingest.verdicts import verdict_paths

    cfg, ing = params.validation, params.ingest
    for old in verdict_paths(ing.out_dir):
        old.unlink(missing_ok=True)  # a judgement that does not complete leaves no verdict behind
    manifest = ing.out_dir / "manifest.parquet"
    rep = validate_manifest(
        manifest, params.ingest.pile_sources(), quarantine_path=ing.out_dir / "quarantine.json",
        min_size=cfg.min_size or params.pretrain.student.img_size, max_nodata_fraction=cfg.max_nodata_fraction,
        max_bad_fraction=ing.max_bad_fraction, allowed_bands=cfg.allowed_bands, mean_range=cfg.mean_range,
        out_dir=ing.out_dir / "validation", data_docs=cfg.data_docs,
    )
    judged = json.loads(rep.json_path.read_text())["manifest_sha256"]
    table, sha = load_manifest(manifest)
    if sha != judged:
        raise DataValidationError(f"{manifest}: rewritten while `gfm validate` ran; run it again")
    leaks = run_contamination_check(params, table, sha)
    failed = tuple(f.name for f in rep.failed)
    summary = rep.summary() + "\n" + leaks.summary()
    if leaks.problems:
        failed += ("downstream_tasks_checked",)
        summary += "\nFAILED downstream_tasks_checked: " + "; ".join(leaks.problems)
    if leaks.offenders:
        failed += ("no_test_images_in_pile",)
        names = "; ".join(f"{o['test_image']} ~ {o['pile_image']} ({o['kind']}, d={o['distance']})"
                          for o in leaks.offenders[:5])
        summary += f"\nFAILED no_test_images_in_pile: {len(leaks.offenders)} downstream val/test image(s) in " \
                   f"the pile: {names}"
    return ValidateResult(
        success=rep.success and leaks.success, n_expectations=rep.n_expectations + 2, failed=failed,
        json=rep.json_path, docs=rep.docs_index, summary=summary,
    )


@dataclass(frozen=True)
class ShardsResult:
    """Training shards written from a validated manifest."""

    shard_dir: Path
    images: int
    shards: int
    bytes: int
    rebuilt: bool
    content_hash: str

    def tracked_metrics(self) -> dict[str, float]:
        """What the stage logs (MLflow, Dagster): the same names whoever runs it."""
        return {"images": self.images, "shards": self.shards, "bytes": self.bytes}

    def tracked_files(self) -> dict[str, Path]:
        """The files the stage's tracked run keeps."""
        return {}


def run_shards(params: Params, *, progress: bool = True) -> ShardsResult:
    """Decode every image of the validated pile once into uint8 Arrow shards (skipped when up to date).

    Raises:
        DataValidationError: the pile did not pass ``gfm validate``, or was re-ingested since (run it again).
    """
    from gfm_core.data.ingest.shards import write_shards
    from gfm_core.data.ingest.verdicts import require_verdicts

    ing = params.ingest
    judged = require_verdicts(ing.out_dir)
    from gfm_core.data.ingest.stats import load_stretches

    rep = write_shards(
        ing.out_dir / "manifest.parquet", ing.out_dir / "shards", data_root=ing.root, shard_size=ing.shard_size,
        images_per_shard=ing.images_per_shard, progress=progress,
        stretch=load_stretches(ing.out_dir / "norm_stats.json") if ing.stretch else None,
    )
    if rep.content_hash != judged["manifest_content_hash"]:  # re-ingested while the shards were written
        raise DataValidationError(
            f"{rep.shard_dir}: shards hold pile {rep.content_hash[:12]}, but the validated pile is "
            f"{judged['manifest_content_hash'][:12]} (re-ingested meanwhile); run `gfm validate`, then `gfm shards`"
        )
    return ShardsResult(
        shard_dir=rep.shard_dir, images=rep.images, shards=rep.shards, bytes=rep.bytes, rebuilt=rep.rebuilt,
        content_hash=rep.content_hash,
    )
