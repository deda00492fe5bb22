"""Frozen-teacher targets computed once for a fixed pool of views: an optional speed-up of pretraining.

The teacher is frozen, so its target for a view never changes; running it live costs several times the
student's step when the teacher is the bigger network (EfficientNet-Lite0 at 128 px against a 2.7 M-parameter
Swin at 64 px: about 4x here). With ``pretrain.teacher_pool: N`` the pile yields ``N`` fixed views (drawn like
training views, from training images only) whose teacher targets are computed once and stored beside the shards;
training then picks views from the pool (a fresh SimMIM mask every time), so the student still sees a new
masking of a view at every step, but only ``N`` distinct crops. The views are stored too (uint8, 12 KB each at
64 px), so a step only normalises and masks them: no decoding, cropping or resizing.

Building a pool costs teacher forwards that no training step counts: the pool records them (``cost``: FLOPs
counted by torch's ``FlopCounterMode`` over every forward, and the seconds), in the file's metadata too, so the
compute ledger of every run that reads the pool names the one-off cost it rests on.

The file is keyed by everything the targets depend on (teacher weights sha256 and geometry, the shards'
generation, the view settings, pool size and seed, the student's normalisation): a new teacher, another pile or
other crop settings compute a new pool instead of reusing a stale one. It is a safetensors file (nothing
pickled) whose metadata holds the key, written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from gfm_core.data.pretrain.stream import Crop, PretrainStream
from gfm_core.errors import CheckpointError
from gfm_core.io import sha256_json, write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherPool:
    """``N`` views and the teacher's target of each.

    Attributes:
        crops: ``[N, 6]`` int64 rows of :meth:`Crop.as_row`.
        views: ``[N, C, S, S]`` uint8: the views themselves (a step then only normalises and masks them).
        targets: ``[N, D]`` float32 teacher features.
        key: what the targets were computed for (:func:`pool_key`).
        cost: what building it took: ``flops`` (teacher forwards) and ``seconds``; ``cached`` when this run read
            it from the file instead of building it (empty for a file written before costs were recorded).
    """

    crops: np.ndarray
    views: Tensor
    targets: Tensor
    key: str
    cost: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.crops)

    def crop(self, j: int) -> Crop:
        """View ``j``."""
        image, top, left, h, w, flip = (int(v) for v in self.crops[j])
        return Crop(image, top, left, h, w, bool(flip))


def pool_key(stream: PretrainStream, size: int, seed: int, teacher: Mapping[str, Any]) -> str:
    """The hash of everything a pool's targets depend on (``teacher``: sha256, arch, input size, stage)."""
    return sha256_json({
        "teacher": dict(teacher), "shards": stream.generation, "manifest": stream.content_hash,
        "img_size": stream.img_size, "mean": stream.mean, "std": stream.std, "size": size, "seed": seed,
        "held_out": stream.held_out.tolist(), "sampler": stream.sampler_settings,
    })


def load_or_build_pool(
    stream: PretrainStream,
    teacher: Callable[[Tensor], Tensor],
    path: Path,
    *,
    size: int,
    seed: int,
    teacher_id: Mapping[str, Any],
    batch_size: int = 128,
) -> TeacherPool:
    """The pool at ``path`` if its key matches, else a new one computed with ``teacher`` and written there.

    Args:
        stream: the training stream (its sampler draws the views, its ``render`` makes them).
        teacher: normalised ``[B, C, S, S]`` student views -> ``[B, D]`` targets (preprocessing included).
        path: the pool file (``.safetensors``).
        size: views in the pool.
        seed: seed of the view draws (independent of the training seed: one pool serves every seed).
        teacher_id: what identifies the teacher (sha256 of its weights, arch, input size, stage).
        batch_size: views per teacher forward.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    key = pool_key(stream, size, seed, teacher_id)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") == key:
                    cost = {**json.loads(meta.get("cost", "{}")), "cached": True}
                    return TeacherPool(f.get_tensor("crops").numpy(), f.get_tensor("views"), f.get_tensor("targets"),
                                       key, cost)
        except Exception as e:  # a foreign or damaged file: rebuilt below
            log.warning("%s: unreadable teacher pool (%s); recomputing it", path, e)
        log.info("%s: teacher pool of other settings or teacher; recomputing it", path)
    rng = np.random.default_rng([seed, 0x7001])
    crops = [stream.sampler.draw(rng) for _ in range(size)]
    views = torch.stack([stream.view(c) for c in crops])
    t0 = time.perf_counter()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        targets = torch.cat([teacher(torch.stack([stream.normalise(v) for v in views[s : s + batch_size]]))
                             .float().cpu() for s in range(0, size, batch_size)])
    cost = {"flops": int(counter.get_total_flops()), "seconds": time.perf_counter() - t0}
    if not torch.isfinite(targets).all():
        raise CheckpointError(f"{path}: the teacher produced non-finite targets; check teacher.checkpoint")
    rows = torch.tensor([c.as_row() for c in crops], dtype=torch.int64)
    write_bytes(path, save({"crops": rows, "views": views.contiguous(), "targets": targets.contiguous()},
                           metadata={"key": key, "cost": json.dumps(cost)}))
    log.info("teacher pool: %d views, targets %s -> %s (%.3g FLOPs, %.1f s)", size, tuple(targets.shape), path,
             cost["flops"], cost["seconds"])
    _prune(path.parent, keep=KEEP_POOLS)
    return TeacherPool(rows.numpy(), views, targets, key, {**cost, "cached": False})


KEEP_POOLS = 2  # pools of other teachers or settings kept beside the newest (a switch back costs nothing)


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently written pools in ``folder``."""
    pools = sorted(folder.glob("pool-*.safetensors"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in pools[keep:]:
        old.unlink(missing_ok=True)
