"""The evidence of a promotion: one model's per-sample test statistics, written as ``evidence.json`` + ``.npz``."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.config import Params
from gfm_core.errors import CheckpointError, ConfigError

EVIDENCE_DIR = "evidence"
EVIDENCE_FILE = "evidence.json"
EVIDENCE_SCHEMA = "gfm.promotion.evidence/1"


@dataclass(frozen=True)
class TaskEvidence:
    """One model on one task: per-seed, per-sample statistics of the test split.

    Attributes:
        task, head, headline: the task, its head, and the metric ARP uses.
        ids: the test samples, in row order of every ``stats`` array.
        stats: seed -> statistic name -> ``[n_samples, ...]`` array (see ``metrics_from_stats``).
    """

    task: str
    head: str
    headline: str
    ids: tuple[str, ...]
    stats: dict[int, dict[str, np.ndarray]]

    def score(self, seeds: Sequence[int] | None = None) -> float:
        """The headline metric averaged over ``seeds`` (default all)."""
        from gfm_core.evaluation.metrics import metrics_from_stats

        use = sorted(self.stats) if seeds is None else list(seeds)
        return float(np.mean([metrics_from_stats(self.head, self.stats[s])[self.headline] for s in use]))


@dataclass(frozen=True)
class Evaluation:
    """What the gate needs of one evaluation report.

    Attributes:
        candidate: the model being judged (a row of the report).
        arp: model -> ARP (NaN = not evaluated).
        baseline: the ARP reference model; ``baseline_scores`` its headline score per task.
        evidence: task -> the candidate's :class:`TaskEvidence`.
        missing: results the report lacks.
        weights_sha256: the backbone bytes the candidate's fine-tuning results started from (None: unknown);
            the gate refuses a version whose registered weights differ.
    """

    candidate: str
    arp: dict[str, float]
    baseline: str
    baseline_scores: dict[str, float]
    evidence: dict[str, TaskEvidence]
    missing: tuple[str, ...] = ()
    weights_sha256: str | None = None

    @classmethod
    def from_report(cls, report: Any, params: Params, candidate: str | None = None) -> Evaluation:
        """Collect the candidate's per-sample results (``finetune.out_dir``) for the report's tasks and seeds.

        Raises:
            ConfigError: the candidate is not a model of the report, the report pools it (pretraining seeds), or its
                results are paper-scored (best val epoch).
            CheckpointError: a result file the report used is gone, or the results changed since the report.
        """
        from gfm_core.evaluation.report import load_run
        from gfm_core.evaluation.results import RESULT_FILE, result_dir

        name = candidate or params.promote.candidate
        pooled = getattr(report, "pretrainings", {})
        if name in pooled or any(name in members for members in pooled.values()):
            raise ConfigError(
                f"promote.candidate {name!r}: the report pools it with other pretraining runs "
                f"(evaluate.pretraining_seeds {pooled}); the gate registers one backbone on the evidence of its "
                f"own results, so evaluate without pooling it (empty evaluate.pretraining_seeds), then promote"
            )
        if name not in report.models:
            raise ConfigError(f"promote.candidate {name!r} is not a model of the evaluation report {report.models}")
        if getattr(report, "scoring", None) == "paper":
            raise ConfigError(
                "the evaluation report holds finetune.scoring: paper results (the best val epoch of each run, a "
                "selection on the scored split); the gate judges test-split results: fine-tune with "
                "finetune.scoring: test (`-S finetune.scoring=test`), evaluate, then promote"
            )
        evidence = {}
        shas: dict[str | None, list[str]] = {}
        scored = [t for t in report.tasks if t not in getattr(report, "arp_excluded", {})]  # ARP's own tasks
        for task in scored:
            seeds = report.seeds.get(name, {}).get(task, [])
            runs = [load_run(result_dir(params.finetune, task, name, s) / RESULT_FILE) for s in seeds]
            for r in runs:
                shas.setdefault(r.backbone_sha256, []).append(str(r.source))
            if not runs:
                continue
            ids = tuple(runs[0].ids)
            for r in runs[1:]:
                if tuple(r.ids) != ids:
                    raise CheckpointError(
                        f"{result_dir(params.finetune, task, name, r.seed)}: seed {r.seed} was tested on other "
                        f"samples than seed {runs[0].seed}; re-run its fine-tuning"
                    )
            evidence[task] = TaskEvidence(
                task, runs[0].head, runs[0].headline, ids, {r.seed: dict(r.stats) for r in runs}
            )
        reported = getattr(report, "backbones", {}).get(name)
        if len(shas) > 1 or (shas and reported is not None and reported not in shas):
            found = "; ".join(f"{k or 'unrecorded'}: {', '.join(v)}" for k, v in shas.items())
            raise CheckpointError(
                f"the fine-tuning results of {name} changed since the evaluation report (which used backbone "
                f"sha256 {reported}; now {found}); re-run `gfm evaluate`, then `gfm promote`"
            )
        base = {t: float(report.cell(report.baseline, t)) for t in scored}
        return cls(name, {m: float(v) for m, v in report.arp.items()}, report.baseline, base, evidence,
                   tuple(report.missing), next(iter(shas), reported))


def save_evidence(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write the candidate's evidence (``evidence.json`` + ``<task>/seed_<s>.npz``); returns ``out_dir``."""
    from gfm_core.io import write_bytes, write_json

    out = Path(out_dir)
    tasks = {}
    for task, ev in evaluation.evidence.items():
        for seed, stats in ev.stats.items():
            buf = io.BytesIO()
            arrays: dict[str, Any] = {k: np.asarray(v) for k, v in stats.items()}
            np.savez(buf, **arrays)
            write_bytes(out / task / f"seed_{seed}.npz", buf.getvalue())
        tasks[task] = {"head": ev.head, "headline": ev.headline, "ids": list(ev.ids), "seeds": sorted(ev.stats)}
    write_json(out / EVIDENCE_FILE, {
        "schema": EVIDENCE_SCHEMA, "model": evaluation.candidate, "tasks": tasks,
        "arp": {k: (v if math.isfinite(v) else None) for k, v in evaluation.arp.items()},
        "baseline": evaluation.baseline, "baseline_scores": evaluation.baseline_scores,
    })
    return out


def load_evidence(folder: str | Path) -> dict[str, TaskEvidence]:
    """Read what :func:`save_evidence` wrote.

    Raises:
        CheckpointError: a file is missing or not evidence.
    """
    folder = Path(folder)
    index = folder / EVIDENCE_FILE
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read promotion evidence ({e})") from e
    if meta.get("schema") != EVIDENCE_SCHEMA:
        raise CheckpointError(f"{index}: schema {meta.get('schema')!r}, expected {EVIDENCE_SCHEMA!r}")
    out = {}
    for task, t in meta["tasks"].items():
        stats = {}
        for seed in t["seeds"]:
            path = folder / task / f"seed_{seed}.npz"
            try:
                with np.load(path, allow_pickle=False) as z:
                    stats[int(seed)] = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read promotion evidence ({e})") from e
        out[task] = TaskEvidence(task, t["head"], t["headline"], tuple(t["ids"]), stats)
    return out

