"""A promotion worker process for the concurrency tests (imports mlflow and gfm_core.registry only, no torch)."""

from __future__ import annotations

from typing import Any


def sha_of(version: str) -> str:
    """A stand-in weights sha256 for a hand-registered version."""
    return f"{int(version):064x}"


def promotion_worker(uri: str, jobs: Any, results: Any, barrier: Any) -> None:
    """Promote what ``jobs`` sends (``(name, version, arp)``; None ends it) into the MLflow store at ``uri``.

    Every job waits at ``barrier`` first, so the workers' promotions start together. The outcome goes to
    ``results`` as ``(name, version, promoted, reasons, error)``. Candidates are judged on ARP point estimates
    against ImageNet's 0 (no per-sample evidence), with weights ``sha_of(version)``.
    """
    import mlflow

    from gfm_core import registry
    from gfm_core.config import PromoteCfg

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    while (job := jobs.get()) is not None:
        name, version, arp = job
        evaluation = registry.Evaluation("gfm", {"gfm": arp, "imagenet": 0.0}, "imagenet", {}, {},
                                         weights_sha256=sha_of(version))
        barrier.wait()
        try:
            d = registry.promote(client, name, version, evaluation, PromoteCfg())
            results.put((name, version, d.promoted, d.reasons, None))
        except Exception as e:  # reported to the test, which fails on it
            results.put((name, version, None, None, f"{type(e).__name__}: {e}"))
