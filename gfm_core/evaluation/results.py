"""A fine-tuning run's record: ``result.json`` (:class:`FinetuneResult`) and ``scores.parquet`` (per-sample
statistics for the paired bootstrap), both written atomically into ``<finetune.out_dir>/<task>/<model>/seed_<seed>/``
(:func:`result_dir`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.config import FinetuneCfg
from gfm_core.errors import CheckpointError
from gfm_core.io import write_bytes

RESULT_FILE = "result.json"
SCORES_FILE = "scores.parquet"


@dataclass(frozen=True)
class FinetuneResult:
    """One (task, model, seed) fine-tuning run and its metrics.

    ``protocol`` and ``scoring`` record how the numbers were made (``finetune.protocol``/``finetune.scoring``);
    a result.json written before they existed loads with the defaults it was made with. Under ``scoring:
    paper`` the metrics, ``test_samples`` and ``scores.parquet`` are those of the val split at ``best_step``.
    """

    task: str
    head: str
    model: str
    seed: int
    metrics: dict[str, float]
    headline: str
    steps: int
    train_samples: int
    test_samples: int
    seconds: float
    device: str
    out_dir: Path
    result_json: Path
    scores: Path
    backbone: dict[str, Any] = field(default_factory=dict)
    label_fraction: float = 1.0
    history: list[dict[str, float]] = field(default_factory=list)
    protocol: str = "finetune"  # finetune.protocol: finetune | frozen | linear
    scoring: str = "test"  # finetune.scoring: test (test split, end of training) | paper (val split, best epoch)
    best_step: int | None = None  # scoring paper: the optimizer step of the best val epoch
    compute: dict[str, Any] = field(default_factory=dict)  # the run's ledger (gfm_core.training.ledger); {}: older

    @property
    def score(self) -> float:
        """The headline metric (ARP, bootstrap)."""
        return self.metrics[self.headline]

    @property
    def backbone_sha256(self) -> str | None:
        """What the run started from (:func:`gfm_core.models.loading.backbone_sha256`); None when unrecorded."""
        return self.backbone.get("sha256")

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values (paths as strings)."""
        d = asdict(self)
        for k in ("out_dir", "result_json", "scores"):
            d[k] = str(d[k])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FinetuneResult:
        """The result :meth:`to_json` wrote."""
        d = dict(d)
        for k in ("out_dir", "result_json", "scores"):
            d[k] = Path(d[k])
        return cls(**d)


def result_dir(cfg: FinetuneCfg, task: str, model: str, seed: int) -> Path:
    """``<out_dir>/<task>/<model>/seed_<seed>``."""
    return Path(cfg.out_dir) / task / model / f"seed_{seed}"


def load_result(path: str | Path) -> FinetuneResult:
    """Read a ``result.json`` (or the run folder holding one).

    Raises:
        CheckpointError: missing or unreadable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: fine-tuning result not found (run gfm finetune for it first)")
    try:
        return FinetuneResult.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a fine-tuning result ({e})") from e


def save_scores(
    path: Path, ids: Sequence[str], stats: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Per-sample statistics as parquet (one row per test sample; N-D stats flattened, shapes in metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {"id": pa.array(list(ids), pa.string())}
    shapes = {}
    for k, v in stats.items():
        if len(v) != len(ids):
            raise ValueError(f"{k}: {len(v)} rows for {len(ids)} samples")
        shapes[k] = list(v.shape[1:])
        if v.ndim == 1:
            cols[k] = pa.array(v)
        else:
            flat = v.reshape(len(v), -1)
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    table = pa.table(cols).replace_schema_metadata({"gfm": json.dumps({"shapes": shapes, **meta})})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return write_bytes(path, buf.getvalue())


def scores_meta(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`save_scores` wrote (empty when the file is missing or has none)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        return {}
    meta = pq.read_schema(path).metadata or {}
    return dict(json.loads(meta[b"gfm"])) if b"gfm" in meta else {}


def load_scores(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(ids, stats)`` written by :func:`save_scores`.

    Raises:
        CheckpointError: missing or unreadable.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: per-sample scores not found (rerun gfm finetune for this result)")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"gfm"])
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise CheckpointError(f"{path}: cannot read per-sample scores ({type(e).__name__}: {e})") from e
    ids = [str(v) for v in table.column("id").to_pylist()]
    stats = {}
    for k, shape in meta["shapes"].items():
        col = table.column(k).combine_chunks()
        flat = col.values if shape else col
        stats[k] = np.array(flat.to_numpy(zero_copy_only=False)).reshape(len(ids), *shape)  # a writable copy
    return ids, stats
