"""Speed-up candidates for the pretraining step, each against today's candidate path, in one process.

Every variant is :func:`pretrain_step.build_candidate` (the ``fit()`` path: bf16 autocast, bf16 frozen teacher,
fused AdamW; fp32 where ``fit()`` would fall back to it, on a CPU without bf16 kernels) from the same seed and
batch, with one change:

- ``eager``: unchanged (the reference);
- ``compile``: ``torch.compile`` (inductor) of the student and the teacher; the first step's extra time is
  reported as compile time (``TORCHINDUCTOR_CACHE_DIR`` keeps the cache between runs);
- ``sdpa``: timm's Swin attention through ``F.scaled_dot_product_attention`` (``set_fused_attention``) in the
  student and the teacher;
- ``channels_last``: the model and the image batch in ``torch.channels_last``.

Variants run alternating (rotating order) after warm-up; the ratio is a variant's median step time over
``eager``'s (< 1 = faster), with its first loss relative to ``eager``'s first loss (same weights, same batch).
Geometries: ``tiny`` (smoke), ``swinb-d2`` (Swin-B widths, heads and image sizes, depths (2, 2, 2, 2): every
block shape of the paper's Swin-B, at a fraction of the compile time), ``paper``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/candidates.py --geometry swinb-d2 --batch 2 --steps 5 --variants eager,sdpa
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import record  # noqa: E402
from benchmarks.pretrain_step import GEOMETRIES, Geometry, build_candidate, make_batch, write_teacher  # noqa: E402

VARIANTS = ("eager", "compile", "sdpa", "channels_last")


def _variant(name: str, g: Geometry, batch: dict[str, torch.Tensor], precision: str, teacher: Path) -> Callable:
    """One variant's step function (forward, backward, optimizer step) -> loss."""
    from gfm_core.models.backbones import set_fused_attention

    device = batch["image"].device
    _, objective, backend = build_candidate(g, device, precision, teacher, 1e-4, name == "compile")
    if name == "sdpa":
        set_fused_attention(objective.student.encoder)
        set_fused_attention(objective.teacher.model)
    if name == "channels_last":
        objective.to(memory_format=torch.channels_last)
        batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}

    def step() -> float:
        out = backend.forward(batch)
        backend.backward(out["loss"])
        backend.step()
        return float(out["loss"].detach())

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the variants; print and return ratios to ``eager``; write a results JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="swinb-d2")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default="eager,sdpa,channels_last", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="default: what fit() runs here (bf16, or fp32 on a CPU without bf16 kernels)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        from gfm_core.training.backends.base import effective_precision

        args.precision = effective_precision("bf16", "cpu")
    names = ["eager", *(v for v in args.variants.split(",") if v and v != "eager")]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    g, device = GEOMETRIES[args.geometry], torch.device("cpu")
    machine = record.machine(device)
    batch = make_batch(g, args.batch, device)
    with tempfile.TemporaryDirectory(prefix="gfm_candidates_") as tmp:
        teacher = write_teacher(g, Path(tmp))
        steps = {n: _variant(n, g, batch, args.precision, teacher) for n in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        first: dict[str, list[float]] = {n: [] for n in names}  # warm-up step times
        losses: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.warmup + args.steps):
            order = names[i % len(names) :] + names[: i % len(names)]
            for n in order:
                t0 = time.perf_counter()
                loss = steps[n]()
                (first[n] if i < args.warmup else times[n]).append(time.perf_counter() - t0)
                losses[n].append(loss)
            last = {n: (times[n] or first[n])[-1] for n in names}
            record.progress("candidates", f"round {i + 1}: " + ", ".join(f"{n} {t:.3f} s" for n, t in last.items()))
    machine["load_avg_1_5_15_end"] = record.machine(device)["load_avg_1_5_15"]
    ref = statistics.median(times["eager"])
    out: dict[str, Any] = {"machine": machine, "versions": record.versions(), "settings": vars(args) | {"json": None}}
    for n in names:
        st = record.stats(times[n])
        loss0, ref0 = losses[n][0], losses["eager"][0]
        out[n] = {
            "step_s": times[n],
            "warmup_step_s": first[n],
            "stats": st,
            "ratio_to_eager": st["median"] / ref,
            "losses": losses[n],
            "first_loss": loss0,
            "first_loss_rel_diff": abs(loss0 - ref0) / abs(ref0),
            "first_step_extra_s": first[n][0] - st["median"] if first[n] else None,
        }
        print(
            f"{n:<14} median {st['median']:.3f} s (IQR {st['iqr_rel']:.0%}) ratio {out[n]['ratio_to_eager']:.3f}x "
            f"eager; first loss {loss0:.5f} (rel diff {out[n]['first_loss_rel_diff']:.1e}); "
            f"first step +{out[n]['first_step_extra_s'] or 0:.1f} s"
        )
    load = (machine["load_avg_1_5_15"] or [0])[0], (machine["load_avg_1_5_15_end"] or [0])[0]
    print(f"{g.name}, batch {args.batch}, {torch.get_num_threads()} thread(s), load {load[0]:.2f} -> {load[1]:.2f}")
    path = record.write(out, args.json or record.default_path(device, f"candidates-{g.name}"))
    print(f"results {path}")
    return out


if __name__ == "__main__":
    main()
