"""Registered versions side by side: each version's raw downstream scores against a reference version, with
paired bootstrap intervals (the comparison the gate makes, for any versions, e.g. one student per teacher).

Every version registered by ``gfm promote`` names the run holding its per-sample test statistics (tag
``gfm.evidence_run_id``); two versions pair when they were tested on the same samples and seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gfm_core.errors import ConfigError
from gfm_core.registry.comparison import ArpDifference, arp_difference
from gfm_core.registry.evidence import TaskEvidence
from gfm_core.registry.gate import read_version_evidence, version_at_alias


@dataclass(frozen=True)
class VersionRow:
    """One version against the reference: its teacher, gate verdict, and the paired comparison (None for the
    reference itself)."""

    version: str
    teacher: str
    teacher_sha256: str
    gate: str
    scores: dict[str, float]
    versus: ArpDifference | None


def _resolve(client: Any, name: str, ref: str) -> Any:
    """``3``, ``v3`` or ``@champion`` -> the model version."""
    if ref.startswith("@"):
        mv = version_at_alias(client, name, ref[1:])
        if mv is None:
            raise ConfigError(f"models:/{name}{ref}: no version holds alias {ref[1:]!r}")
        return mv
    return client.get_model_version(name, ref.removeprefix("v"))


def _evidence(client: Any, name: str, mv: Any) -> dict[str, TaskEvidence]:
    """The per-sample test statistics ``mv`` was judged on."""
    run_id = mv.tags.get("gfm.evidence_run_id")
    if not run_id:
        raise ConfigError(f"models:/{name}/{mv.version} has no stored evidence (tag gfm.evidence_run_id): it was "
                          f"registered without a promotion run, so it cannot be compared sample by sample")
    return read_version_evidence(client, name, str(mv.version), run_id)


def compare_versions(
    name: str, refs: Sequence[str], *, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0
) -> list[VersionRow]:
    """``refs[0]`` is the reference; every other version is compared with it on the same samples and seeds."""
    import mlflow

    if len(refs) < 2:
        raise ConfigError("compare at least two versions: the reference first, e.g. `1 2 3` or `@champion 4`")
    client = mlflow.MlflowClient()
    versions = [_resolve(client, name, r) for r in refs]
    evidence = [_evidence(client, name, mv) for mv in versions]
    rows = []
    for i, (mv, ev) in enumerate(zip(versions, evidence, strict=True)):
        versus = None
        if i:
            versus, why = arp_difference(ev, evidence[0], n_bootstrap=n_bootstrap, ci=ci, seed=seed)
            if versus is None:
                raise ConfigError(f"models:/{name}/{mv.version} vs v{versions[0].version}: " + "; ".join(why))
        rows.append(VersionRow(str(mv.version), mv.tags.get("gfm.teacher", "?"),
                               mv.tags.get("gfm.teacher_sha256", "?"), mv.tags.get("gfm.gate", "?"),
                               {t: e.score() for t, e in sorted(ev.items())}, versus))
    return rows


def render_markdown(rows: Sequence[VersionRow]) -> str:
    """A table: per version, each task's headline score in percent (difference to the reference with its
    interval) and the ARP with the reference as baseline."""
    ref = rows[0]
    tasks = sorted(ref.scores)
    ci = next((r.versus.ci for r in rows if r.versus is not None), 0.95)
    head = ["version", "teacher", "gate", *tasks, f"ARP vs v{ref.version} [{ci:.0%} CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"v{r.version}", r.teacher, r.gate]
        for t in tasks:
            d = r.versus.per_task.get(t) if r.versus is not None else None
            cells.append(f"{r.scores[t]:.1f}" if d is None else
                         f"{d.candidate:.1f} ({d.diff:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}])")
        v = r.versus
        cells.append("reference" if v is None else f"{v.diff:+.2f} [{v.lo:+.2f}, {v.hi:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
