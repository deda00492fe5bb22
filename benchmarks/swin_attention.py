"""timm's Swin attention, its own path against ``F.scaled_dot_product_attention``, on this machine.

Swin-B at the paper's geometry (student 192 px window 6 forward + backward; frozen teacher 224 px window 7
forward under ``no_grad``), bf16 autocast as the candidate runs it, the two attention paths alternating in
one process (median step time per path). On the CPU a bias that needs a gradient (the student's trainable
relative-position table) sends SDPA to its math fallback; the frozen teacher's bias does not.

Usage (from the repository root)::

    .venv/bin/python benchmarks/swin_attention.py --batch 2 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gfm_core.models.backbones import set_fused_attention  # noqa: E402


def _time(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Time both attention paths for the student (fwd + bwd) and the teacher (fwd); print the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (each path once per round)")
    p.add_argument("--tiny", action="store_true", help="Swin with embed_dim 32, depths (1,1,1,1): smoke test")
    args = p.parse_args(argv)
    extra: dict[str, Any] = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)) if args.tiny else {}
    arch = "swin_base_patch4_window7_224"
    student: Any = timm.create_model(arch, pretrained=False, num_classes=0, img_size=192, window_size=6, **extra)
    teacher: Any = timm.create_model(arch, pretrained=False, num_classes=0, img_size=224, **extra).eval()
    teacher.requires_grad_(False)
    xs, xt = torch.randn(args.batch, 3, 192, 192), torch.randn(args.batch, 3, 224, 224)

    def s_step() -> None:
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student.forward_features(xs)
        out.float().square().mean().backward()

    def t_step() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            teacher.forward_features(xt)

    times: dict[str, list[float]] = {k: [] for k in ("student timm", "student sdpa", "teacher timm", "teacher sdpa")}
    for i in range(args.steps + 1):  # round 0 is the warm-up
        for fused in (False, True) if i % 2 == 0 else (True, False):
            set_fused_attention(student, fused)
            set_fused_attention(teacher, fused)
            tag = "sdpa" if fused else "timm"
            s, t = _time(s_step, 1), _time(t_step, 1)
            if i:
                times[f"student {tag}"].append(s)
                times[f"teacher {tag}"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<14} {v:8.3f} s (median of {args.steps})")
    for who in ("student", "teacher"):
        print(f"{who}: sdpa / timm step time = {med[who + ' sdpa'] / med[who + ' timm']:.2f}")
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, torch {torch.__version__}, timm {timm.__version__}")
    return med


if __name__ == "__main__":
    main()
