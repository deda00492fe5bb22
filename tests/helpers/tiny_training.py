"""A tiny regression objective, a deterministic sharded loader, and a torchrun entry point for the loop tests.

Run as a script under a launcher to train with several processes, e.g.::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/helpers/tiny_training.py \
        --backend deepspeed --zero-stage 1 --out /tmp/run2 --steps 6
    deepspeed --num_gpus 2 --no_local_rank --master_port 29600 tests/helpers/tiny_training.py --backend
    deepspeed ...

(``deepspeed`` without GPUs also needs ``DS_ACCELERATOR=cpu``.) Rank 0 writes ``<out>/history.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

D_IN, D_OUT, N_SAMPLES = 8, 4, 64


class TinyRegression(nn.Module):
    """``x -> MLP -> y`` with an MSE loss; returns the timm-style dict (loss, components, a non-scalar
    output)."""

    def __init__(self, hidden: int = 32, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(D_IN, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, D_OUT)
        )
        self.norm = nn.LayerNorm(D_OUT)
        self.mask_token = nn.Parameter(
            torch.zeros(1, 1, D_IN)
        )  # unused in the math; exercises the no-decay rule

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.net(batch["x"] + 0.0 * self.mask_token.reshape(1, -1))
        pred = pred + 0.0 * self.norm(pred)
        err = pred.float() - batch["y"].float()
        mse = err.pow(2).mean()
        return {"loss": mse, "mse": mse.detach(), "mae": err.abs().mean().detach(), "output": pred}


def dataset(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``N_SAMPLES`` fixed (x, y) pairs of a noisy linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D_IN, generator=g)
    w = torch.randn(D_IN, D_OUT, generator=g)
    return x, x @ w + 0.05 * torch.randn(N_SAMPLES, D_OUT, generator=g)


def make_loader_factory(
    global_batch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    noise: float = 0.0,
    poison_at: int | None = None,
) -> Any:
    """``epoch -> iterator`` over this rank's share of each global micro-batch.

    The epoch's permutation comes from a generator seeded by the epoch (the same on every rank); each global
    micro-batch of ``global_batch`` rows is split into ``world_size`` equal slices. ``noise`` adds Gaussian
    noise from the *global* torch RNG (like a random augmentation), ``poison_at`` makes the n-th micro-batch
    (0-based, counted over the whole run) infinite.
    """
    if global_batch % world_size:
        raise ValueError(f"global_batch {global_batch} must be divisible by world_size {world_size}")
    x, y = dataset()
    per_rank = global_batch // world_size
    counter = {"n": 0}

    def factory(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        perm = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(1000 + epoch))
        for start in range(0, N_SAMPLES - global_batch + 1, global_batch):
            idx = perm[start : start + global_batch][rank * per_rank : (rank + 1) * per_rank]
            xb = x[idx].clone()
            if noise:
                xb += noise * torch.randn_like(xb)
            if poison_at is not None and counter["n"] == poison_at:
                xb.fill_(float("inf"))
            counter["n"] += 1
            yield {"x": xb, "y": y[idx]}

    return factory


def train(
    backend_name: str,
    out_dir: Path,
    *,
    steps: int = 6,
    global_batch: int = 16,
    grad_accum: int = 1,
    zero_stage: int = 0,
    precision: str = "fp32",
    resume: bool = False,
    checkpoint_every: int = 3,
    base_lr: float = 1e-2,
) -> Any:
    """Train :class:`TinyRegression` with ``fit`` on the CPU and return the ``FitResult``."""
    from gfm_core.training.backends import DeepSpeedBackend, TorchBackend
    from gfm_core.training.loop import LoopCfg, fit
    from gfm_core.training.optim import param_groups

    if backend_name == "deepspeed":
        backend: Any = DeepSpeedBackend(device="cpu", precision=precision, zero_stage=zero_stage)  # type: ignore[arg-type]
    else:
        backend = TorchBackend(device="cpu", precision=precision)  # type: ignore[arg-type]
    model = TinyRegression()
    cfg = LoopCfg(
        total_steps=steps,
        out_dir=out_dir,
        grad_accum=grad_accum,
        base_lr=base_lr,
        warmup_lr=1e-3,
        min_lr=1e-3,
        warmup_steps=2,
        clip_grad=1.0,
        log_every=1,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=False,
    )
    loaders = make_loader_factory(global_batch, rank=backend.rank, world_size=backend.world_size)
    return fit(model, loaders, backend, cfg, param_groups(model, weight_decay=0.05))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "deepspeed"), default="torch")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    result = train(
        args.backend,
        args.out,
        steps=args.steps,
        global_batch=args.global_batch,
        grad_accum=args.grad_accum,
        zero_stage=args.zero_stage,
        precision=args.precision,
        resume=args.resume,
    )
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        (args.out / "history.json").write_text(json.dumps(result.history))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
