"""One GFM continual-pretraining step: our training path against a plain eager fp32 step of the same math.

Paper geometry (random weights): Swin-B student at 192 px (window 6) with a SimMIM mask token, 1x1-conv +
PixelShuffle decoder and linear projector, against a frozen Swin-B teacher at 224 px (stage 3 incl. its patch
merging, 7x7x1024, pooled) on the resized unmasked image; loss = masked L1 + negative cosine; AdamW (wd 0.05
with GFM's no-decay rule) after grad-norm clipping at 5.

- ``baseline``: the step as a researcher writes it (the way GFM's own code runs it), in this file and without
  any gfm_core code: eager, float32 on the CPU and fp16 AMP with a GradScaler on CUDA (GFM's ``amp``
  path), timm's default attention, teacher forward under ``no_grad`` every step, ``torch.optim.AdamW`` with
  its defaults.
- ``candidate``: what :func:`gfm_core.training.loop.fit` runs: :func:`gfm_core.objectives.
  build_continual_pretrain` (the teacher read from a safetensors file through its real loader), a
  :class:`~gfm_core.training.backends.TorchBackend` with the config's precision (bf16 autocast by default),
  and ``build_optimizer(param_groups(...))``; a step is ``backend.forward`` -> ``backend.backward`` ->
  ``backend.step`` (clip, AdamW, zero grad).

Both start from the same weights and see the same batch; they run in one process, alternating (ABBA order),
after warm-up steps; step times are medians (with the interquartile range). The printed ratio is candidate
images/s over baseline images/s. CPU default: 2 warm-up + 10 timed steps per variant (the first steps create
oneDNN primitives and grow the allocator's pools; a median of ten alternating steps shrugs off two or three
steps disturbed by other processes, and the printed IQR shows how disturbed the run was; about three minutes
for the paper geometry on 2 cores).
FLOPs of one step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` over the candidate's
forward + backward of one image, times the batch (every counted op is linear in the batch). That is the same
math as the baseline's: matmuls, convolutions and attention; the optimizer's element-wise work is not counted.
With ``--grad-checkpointing`` the count runs without it: the recomputed forwards are extra work, not model
FLOPs. Achieved FLOP/s = FLOPs / median step time. The same process measures this
machine's matmul ceiling in the dtype the candidate's matmuls run in (a large ``torch.mm``, median FLOP/s, the
same threads) and prints the candidate's share of it. The candidate's precision is the one ``fit()`` would run:
``precision: bf16`` on a CPU without bf16 kernels trains in fp32 there
(:func:`gfm_core.training.backends.base.effective_precision`), so the candidate and its ceiling are fp32 on
such a host (``GFM_FORCE_BF16=1`` keeps bf16). On CUDA, MFU = the candidate's achieved FLOP/s over the GPU's
dense bf16 peak (table below, or ``--peak-tflops``).

Every run writes a results JSON (machine, versions, settings, every step time, medians, IQR, ratio, FLOP/s,
ceiling) to ``--json`` or ``benchmarks/results/pretrain_step-<device>-<UTC time>.json`` (git-ignored; copy a
run that a document cites to ``benchmarks/reference/``). ``--compare PREVIOUS.json`` prints this run's
median step time over the previous run's per variant and names any machine/version/setting that differs.

Peak memory = resident state (weights, buffers, optimizer state: the tensors' bytes) + the step's own peak
(activations, gradients, temporaries), measured on one extra untimed step per variant: on CUDA
``max_memory_allocated`` above the allocation before the step; on the CPU the rise of the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) above its RSS before the step, after ``malloc_trim``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/pretrain_step.py                    # CPU: batch 8, 2 warm-up + 10 timed steps
    .venv/bin/python benchmarks/pretrain_step.py --device cuda      # batch 64, 3 warm-up + 10 steps, MFU
    .venv/bin/python benchmarks/pretrain_step.py --compare benchmarks/reference/<earlier run>.json
    .venv/bin/python benchmarks/pretrain_step.py --tiny --steps 1 --warmup 0 --json /tmp/step.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import trunc_normal_
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import record  # noqa: E402  (after the path insert: run as a script)

TARGET_SPEEDUP = 1.5
TARGET_MFU = 0.40

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets; the first match wins.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM / HBM3
    ("A100", 312.0),
)


@dataclass(frozen=True)
class Geometry:
    """Student and teacher shapes; the same numbers feed the baseline and the candidate's config."""

    name: str
    student_arch: str
    student_kwargs: dict[str, Any]
    teacher_arch: str
    teacher_img: int
    mask_patch: int
    mask_ratio: float = 0.6
    stage: int = 3
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (reduced geometries)

    @property
    def img(self) -> int:
        return int(self.student_kwargs["img_size"])

    @property
    def patch(self) -> int:
        return int(self.student_kwargs.get("patch_size", 4))


PAPER = Geometry(
    name="paper",
    student_arch="swin_base_patch4_window7_224",
    student_kwargs=dict(img_size=192, window_size=6, patch_size=4, in_chans=3),
    teacher_arch="swin_base_patch4_window7_224",
    teacher_img=224,
    mask_patch=32,
)
TINY = Geometry(  # the smoke-test geometry: same structure, seconds per step
    name="tiny",
    student_arch="swin_tiny_patch4_window7_224",
    student_kwargs=dict(
        img_size=64,
        window_size=4,
        patch_size=4,
        in_chans=3,
        embed_dim=32,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
    ),
    teacher_arch="swin_tiny_patch4_window7_224",
    teacher_img=112,
    mask_patch=16,
)

SWINB_D2 = Geometry(  # every block shape of the paper's Swin-B at depths (2, 2, 2, 2): quick, compiles fast
    name="swinb-d2",
    student_arch=PAPER.student_arch,
    student_kwargs={**PAPER.student_kwargs, "depths": (2, 2, 2, 2)},
    teacher_arch=PAPER.teacher_arch,
    teacher_img=PAPER.teacher_img,
    mask_patch=PAPER.mask_patch,
    teacher_kwargs={"depths": (2, 2, 2, 2)},
)
GEOMETRIES = {g.name: g for g in (PAPER, TINY, SWINB_D2)}

# ----------------------------------------------------------------------------------------------- baseline


class EagerGFM(nn.Module):
    """GFM's objective written plainly (float32, timm defaults), as in the original SimMIM/GFM code.

    Student: timm Swin, mask token blended after ``patch_embed``; distilled feature = stage 3 incl. its patch
    merging (timm: ``layers[3].downsample``), pooled; reconstruction = the rest of the encoder + final norm
    -> ``Conv2d(C, stride^2 * 3, 1)`` -> ``PixelShuffle(stride)``. Teacher: frozen timm Swin on the
    unmasked image resized bilinearly (align_corners=True), run to the same stage under ``no_grad``.
    """

    def __init__(self, g: Geometry, teacher_weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.encoder = timm.create_model(
            g.student_arch, pretrained=False, num_classes=0, drop_path_rate=0.0, **g.student_kwargs
        )
        self.stage = g.stage
        self.patch = g.patch
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        stride = g.patch * 2 ** (len(self.encoder.layers) - 1)
        in_chans = int(g.student_kwargs.get("in_chans", 3))
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, stride**2 * in_chans, kernel_size=1), nn.PixelShuffle(stride)
        )
        self.teacher = timm.create_model(
            g.teacher_arch, pretrained=False, num_classes=0, img_size=g.teacher_img, **g.teacher_kwargs
        )
        self.teacher.load_state_dict(teacher_weights)
        self.teacher.requires_grad_(False)
        self.teacher_size = (g.teacher_img, g.teacher_img)
        s_dim = self.encoder.layers[g.stage].downsample.out_dim
        t_dim = self.teacher.layers[g.stage].downsample.out_dim
        self.projector = nn.Linear(s_dim, t_dim)

    def train(self, mode: bool = True) -> EagerGFM:
        super().train(mode)
        self.teacher.eval()
        return self

    @staticmethod
    def _to_stage(model: nn.Module, t: Tensor, stage: int) -> Tensor:
        for i in range(stage):
            t = model.layers[i](t)
        return model.layers[stage].downsample(t)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        t = self.encoder.patch_embed(x)  # [B, h, w, C]
        w = mask.unsqueeze(-1).type_as(t)
        t = t * (1.0 - w) + self.mask_token * w
        t = self._to_stage(self.encoder, t, self.stage)
        z_s = t.mean(dim=(1, 2))
        t = self.encoder.layers[self.stage].blocks(t)
        for layer in self.encoder.layers[self.stage + 1 :]:
            t = layer(t)
        rec = self.decoder(self.encoder.norm(t).permute(0, 3, 1, 2))
        with torch.no_grad():
            xt = F.interpolate(x, size=self.teacher_size, mode="bilinear", align_corners=True)
            z_t = self._to_stage(self.teacher, self.teacher.patch_embed(xt), self.stage).mean(dim=(1, 2))
        m = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1).type_as(x)
        loss_mim = (F.l1_loss(rec, x, reduction="none") * m).sum() / (m.sum() + 1e-5) / x.shape[1]
        loss_feat = -F.cosine_similarity(self.projector(z_s), z_t, dim=-1).mean()
        return loss_mim + loss_feat


def baseline_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with GFM's groups: no decay for 1-D params, biases, the mask token and position-bias tables."""
    skip = ("mask_token", "relative_position_bias_table", "absolute_pos_embed")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in skip) else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


# ----------------------------------------------------------------------------------------------- harness


def bf16_peak_flops(gpu_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU (None when unknown)."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops * 1e12
    return None


def make_batch(g: Geometry, batch: int, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """A normalised-looking image batch and SimMIM masks (mask-patch grid, ``ceil(n * ratio)`` cells each)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, g.img, g.img, generator=gen)
    cells = g.img // g.mask_patch
    n_mask = math.ceil(cells * cells * g.mask_ratio)
    scale = g.mask_patch // g.patch
    masks = []
    for _ in range(batch):
        m = torch.zeros(cells * cells, dtype=torch.bool)
        m[torch.randperm(cells * cells, generator=gen)[:n_mask]] = True
        masks.append(m.view(cells, cells).repeat_interleave(scale, 0).repeat_interleave(scale, 1))
    return {"image": image.to(device), "mask": torch.stack(masks).to(device)}


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the module's parameters and buffers plus the optimizer's state tensors."""
    seen: set[int] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class HostMemory:
    """Peak RSS of one step (Linux): VmHWM, reset via ``/proc/self/clear_refs``, minus VmRSS before it."""

    def __init__(self) -> None:
        self.libc = None
        with contextlib.suppress(OSError):
            self.libc = ctypes.CDLL("libc.so.6")
        self.available = Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status_kb(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) if match else 0

    def measure(self, fn: Callable[[], Any]) -> int | None:
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)  # hand cached heap back, so the step's own pages show in the peak
        before = self._status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            fn()
            return None
        fn()
        return max(0, self._status_kb("VmHWM") - before) * 1024


@dataclass
class Variant:
    """One way of running the step, and what was measured for it."""

    name: str
    step: Callable[[], tuple[float, float, float, float]]  # -> (loss, forward s, backward s, optimizer s)
    state_fn: Callable[[], int]  # bytes of weights, buffers and optimizer state
    state_bytes: int = 0
    times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    phases: list[tuple[float, float, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_mem_bytes: int | None = None


def write_teacher(g: Geometry, workdir: Path) -> Path:
    """A random-weight teacher (seed 1) as a safetensors file, which the candidate loads through its real loader."""
    torch.manual_seed(1)
    src = timm.create_model(g.teacher_arch, pretrained=False, num_classes=0, img_size=g.teacher_img, **g.teacher_kwargs)
    teacher_file = workdir / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(teacher_file))
    return teacher_file


def build_candidate(
    g: Geometry,
    device: torch.device,
    precision: str,
    teacher_file: Path,
    lr: float,
    compile_candidate: bool,
    *,
    grad_checkpointing: bool = False,
) -> tuple[Any, Any, Any]:
    """The config -> objective -> backend -> optimizer path of ``fit()`` (seed 0): (cfg, objective, backend)."""
    from gfm_core.config import PretrainCfg, StudentCfg, TeacherCfg
    from gfm_core.objectives import build_continual_pretrain
    from gfm_core.training.backends import TorchBackend
    from gfm_core.training.optim import build_optimizer, param_groups

    cfg = PretrainCfg(
        student=StudentCfg(arch=g.student_arch, drop_path_rate=0.0, **g.student_kwargs),
        teacher=TeacherCfg(
            arch=g.teacher_arch,
            checkpoint=teacher_file,
            img_size=g.teacher_img,
            feature_stage=g.stage,
            timm_kwargs=g.teacher_kwargs,
        ),
        mask_patch_size=g.mask_patch,
        mask_ratio=g.mask_ratio,
        precision=precision,
        device=device.type,
        grad_checkpointing=grad_checkpointing,
    )
    torch.manual_seed(0)
    objective = build_continual_pretrain(cfg)
    objective.train()
    backend = TorchBackend(str(device), cfg.precision)
    # as fit() builds it for the torch backend (LoopCfg.fused_optimizer)
    optimizer = build_optimizer(param_groups(objective, cfg.weight_decay), lr=lr, betas=cfg.betas, fused=True)
    backend.prepare(objective, optimizer, grad_accum=1, clip_grad=cfg.clip_grad)
    if compile_candidate:  # experimental: fit() does not compile
        objective.student.compile()
        if objective.teacher is not None:
            objective.teacher.compile()
    return cfg, objective, backend


def build_variants(
    g: Geometry,
    device: torch.device,
    batch_size: int,
    precision: str,
    workdir: Path,
    *,
    lr: float = 1e-4,
    compile_candidate: bool = False,
    grad_checkpointing: bool = False,
) -> tuple[Variant, Variant, Callable[[], None]]:
    """The baseline and candidate steps on the same initial weights, and the candidate's forward+backward of the
    batch's first image (for the FLOP count)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now() -> float:
        sync()
        return time.perf_counter()

    teacher_file = write_teacher(g, workdir)
    cfg, objective, backend = build_candidate(
        g, device, precision, teacher_file, lr, compile_candidate, grad_checkpointing=grad_checkpointing
    )
    optimizer = backend.optimizer

    # baseline: same initial trainable weights, same teacher weights
    baseline = EagerGFM(g, load_file(str(teacher_file)))
    rename = (
        ("student.encoder.", "encoder."),
        ("student.mask_token", "mask_token"),
        ("decoder.conv.", "decoder.0."),
    )
    weights = {}
    for k, v in objective.state_dict().items():
        for old, new in rename:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        weights[k] = v
    result = baseline.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("teacher.") for k in result.missing_keys), result.missing_keys
    baseline.to(device).train()
    b_opt = baseline_optimizer(baseline, lr, cfg.weight_decay)
    b_params = [p for p in baseline.parameters() if p.requires_grad]
    clip = float(cfg.clip_grad or 0.0)
    batch = make_batch(g, batch_size, device)

    # on CUDA GFM's code trains under fp16 AMP with dynamic loss scaling (apex O1 there; torch.amp here)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def baseline_step() -> tuple[float, float, float, float]:
        t0 = now()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = baseline(batch["image"], batch["mask"])
        value = float(loss.detach())
        t1 = now()
        scaler.scale(loss).backward()
        t2 = now()
        scaler.unscale_(b_opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(b_params, clip)
        scaler.step(b_opt)
        scaler.update()
        b_opt.zero_grad(set_to_none=True)
        t3 = now()
        return value, t1 - t0, t2 - t1, t3 - t2

    def candidate_step() -> tuple[float, float, float, float]:
        t0 = now()
        out = backend.forward(batch)
        value = float(out["loss"].detach())
        t1 = now()
        backend.backward(out["loss"])
        t2 = now()
        backend.step()
        t3 = now()
        return value, t1 - t0, t2 - t1, t3 - t2

    one = {k: v[:1] for k, v in batch.items()}  # FLOPs are linear in the batch: count one image

    def candidate_fwd_bwd() -> None:
        encoder = objective.student.encoder  # model FLOPs: gradient checkpointing's recomputed forwards not counted
        encoder.set_grad_checkpointing(False)  # at one image, so switching it off cannot run out of memory
        try:
            out = backend.forward(one)
            backend.backward(out["loss"])
            backend.optimizer.zero_grad(set_to_none=True)
        finally:
            encoder.set_grad_checkpointing(grad_checkpointing)

    base = Variant("baseline", baseline_step, lambda: state_bytes(baseline, b_opt))
    cand = Variant("candidate", candidate_step, lambda: state_bytes(objective, optimizer))
    return base, cand, candidate_fwd_bwd


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of ``fn`` by FlopCounterMode, with the CPU flash-attention kernels counted like the CUDA ones."""
    from torch.utils import flop_counter as fc

    def sdpa(q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def sdpa_bwd(grad_out, q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_bwd
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def _progress(msg: str) -> None:
    record.progress("pretrain_step", msg)


def _summary(v: Variant, batch: int, flops: int) -> dict[str, Any]:
    med = statistics.median(v.times)
    peak = None if v.step_mem_bytes is None else v.state_bytes + v.step_mem_bytes
    return {
        "step_s": [round(t, 4) for t in v.times],
        "warmup_step_s": [round(t, 4) for t in v.warmup_times],
        "step_s_stats": record.stats(v.times),
        "step_s_median": med,
        "step_s_min": min(v.times),
        "images_per_s": batch / med,
        "phases_s_median": {
            name: statistics.median(p[i] for p in v.phases)
            for i, name in enumerate(("forward", "backward", "optimizer"))
        },
        "state_bytes": v.state_bytes,
        "step_mem_bytes": v.step_mem_bytes,
        "peak_mem_bytes": peak,
        "achieved_flops_per_s": flops / med,
        "first_loss": v.losses[0],
        "last_loss": v.losses[-1],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 8 on CPU, 64 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default: 2 CPU, 3 GPU)")
    p.add_argument(
        "--precision",
        default=None,
        choices=("fp32", "bf16", "fp16"),
        help="the candidate's precision (default: the pretrain config's, bf16)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="tiny Swin geometry (smoke test): --geometry tiny")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="paper", help="paper (default), tiny, swinb-d2")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the candidate's student and teacher (experimental; fit does not)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="the candidate recomputes its student's blocks in backward (pretrain.grad_checkpointing)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU on an unlisted GPU")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the results here (default: benchmarks/results/pretrain_step-<device>-<UTC time>.json)",
    )
    p.add_argument("--compare", type=Path, default=None, help="a previous results JSON to compare this run with")
    p.add_argument(
        "--matmul-n",
        type=int,
        default=None,
        help="edge of the matmul that measures the ceiling (default: 512 tiny, 2048 CPU, 8192 CUDA)",
    )
    return p.parse_args(argv)


def _time_variants(variants: tuple[Variant, Variant], warmup: int, steps: int, on_gpu: bool, device: Any) -> None:
    """Warm-up and timed steps, alternating (ABBA); then one untimed step each for memory."""
    for i in range(warmup):
        for v in variants if i % 2 == 0 else variants[::-1]:
            t0 = time.perf_counter()
            v.losses.append(v.step()[0])
            v.warmup_times.append(time.perf_counter() - t0)
    for i in range(steps):
        for v in variants if i % 2 == 0 else variants[::-1]:
            t0 = time.perf_counter()
            loss, *phases = v.step()
            v.times.append(time.perf_counter() - t0)
            v.phases.append((phases[0], phases[1], phases[2]))
            v.losses.append(loss)
            _progress(f"step {i + 1}/{steps} {v.name}: {v.times[-1]:.3f} s")
    _progress("memory: one more step each; then FLOPs of the candidate's forward + backward")
    host = HostMemory()
    for v in variants:
        if on_gpu:
            torch.cuda.synchronize(device)
            gc.collect()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            v.losses.append(v.step()[0])
            torch.cuda.synchronize(device)
            v.step_mem_bytes = torch.cuda.max_memory_allocated(device) - before
        elif host.available:
            v.step_mem_bytes = host.measure(lambda v=v: v.losses.append(v.step()[0]))
        v.state_bytes = v.state_fn()  # after a step: AdamW's state exists


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write the results JSON and return them."""
    args = parse_args(argv)
    from gfm_core.config import PretrainCfg
    from gfm_core.training.backends.base import effective_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    device_arg = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if device_arg == "auto" else device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    g = TINY if args.tiny else GEOMETRIES[args.geometry]
    batch = args.batch or (2 if g is TINY else 64 if on_gpu else 8)
    steps = args.steps if args.steps is not None else 10
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 2)
    if steps < 1 or warmup < 0 or batch < 1:
        raise SystemExit("--steps and --batch must be >= 1, --warmup >= 0")
    previous = record.load(args.compare) if args.compare else None  # fail before the long run
    requested = args.precision or PretrainCfg().precision
    precision = effective_precision(requested, device)  # what fit() runs on this device
    machine = record.machine(device)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    n = args.matmul_n or (512 if g is TINY else 8192 if on_gpu else 2048)
    _progress(f"{precision} matmul ceiling before the steps: {n} x {n}")
    ceiling_before = record.matmul_ceiling(device, n, precision=precision)

    with tempfile.TemporaryDirectory(prefix="gfm_step_bench_") as tmp:
        t_build = time.perf_counter()
        base, cand, cand_fwd_bwd = build_variants(
            g,
            device,
            batch,
            precision,
            Path(tmp),
            compile_candidate=args.compile,
            grad_checkpointing=args.grad_checkpointing,
        )
        build_s = time.perf_counter() - t_build
        _progress(f"built both variants in {build_s:.1f} s; {warmup} warm-up + {steps} timed steps each")
        _time_variants((base, cand), warmup, steps, on_gpu, device)
        flops = count_flops(cand_fwd_bwd) * batch  # the candidate's forward + backward of one image, x batch
    _progress(f"{precision} matmul ceiling after the steps")
    ceiling = record.best_ceiling(ceiling_before, record.matmul_ceiling(device, n, precision=precision))
    machine["load_avg_1_5_15_end"] = record.machine(device)["load_avg_1_5_15"]

    settings = {
        "geometry": g.name,
        "student": f"{g.student_arch} {g.student_kwargs}",
        "teacher": f"{g.teacher_arch} img_size={g.teacher_img} stage {g.stage}",
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "precision": precision,
        "precision_requested": requested,
        "compile": bool(args.compile),
        "grad_checkpointing": bool(args.grad_checkpointing),
        "device": str(device),
    }
    result = _result(created, machine, settings, base, cand, flops, ceiling, build_s, args.peak_tflops)
    print(format_report(result))
    if previous is not None:
        result["compare"] = record.compare(result, previous, args.compare)
        print(record.format_compare(result["compare"]))
    path = record.write(result, args.json or record.default_path(device))
    print(f"results     {path}")
    return result


def _result(
    created: str,
    machine: dict[str, Any],
    settings: dict[str, Any],
    base: Variant,
    cand: Variant,
    flops: int,
    ceiling: dict[str, Any],
    build_s: float,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The results dict: the sections a later run compares with, and the flat keys of earlier versions."""
    on_gpu = machine["device"] == "cuda"
    batch = settings["batch"]
    res_b, res_c = _summary(base, batch, flops), _summary(cand, batch, flops)
    speedup = res_c["images_per_s"] / res_b["images_per_s"]
    peak = peak_tflops * 1e12 if peak_tflops else (bf16_peak_flops(machine["gpu_name"]) if on_gpu else None)
    mfu = res_c["achieved_flops_per_s"] / peak if peak else None
    compile_s = None
    if settings["compile"] and cand.warmup_times:  # the first step compiles; later steps run the cached graphs
        compile_s = cand.warmup_times[0] - res_c["step_s_median"]
    return {
        "schema": record.SCHEMA,
        "created_utc": created,
        "machine": machine,
        "versions": record.versions(),
        "settings": settings,
        "device": machine["device"],
        "device_name": machine["device_name"],
        "threads": machine["threads"],
        "torch": torch.__version__,
        "timm": timm.__version__,
        **{k: settings[k] for k in ("geometry", "student", "teacher", "batch", "steps", "warmup", "precision")},
        "compile": settings["compile"],
        "compile_s": compile_s,
        "build_s": build_s,
        "baseline": res_b,
        "candidate": res_c,
        "speedup": speedup,
        "speedup_fastest_steps": res_b["step_s_min"] / res_c["step_s_min"],
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP,
        "flops_per_step": flops,
        "matmul_ceiling": ceiling,
        "candidate_share_of_ceiling": res_c["achieved_flops_per_s"] / ceiling["flops_per_s"],
        "peak_flops": peak,
        "mfu": mfu,
        "mfu_note": (
            "n/a on CPU" if not on_gpu else ("unknown GPU: pass --peak-tflops" if peak is None else "bf16 dense peak")
        ),
        "memory_method": (
            "cuda max_memory_allocated above the allocation before the step"
            if on_gpu
            else "peak RSS (VmHWM, reset via clear_refs) above RSS before the step, after malloc_trim"
        ),
    }


def _load(machine: dict[str, Any], key: str) -> str:
    loads = machine.get(key)
    return "n/a" if not loads else f"{loads[0]:.2f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table."""
    lines = [
        f"GFM pretraining step benchmark ({r['geometry']} geometry)",
        f"device      {r['device']}: {r['device_name']}; torch {r['torch']}, timm {r['timm']}, {r['threads']} threads; "
        f"load {_load(r['machine'], 'load_avg_1_5_15')} -> {_load(r['machine'], 'load_avg_1_5_15_end')}",
        f"student     {r['student']}",
        f"teacher     {r['teacher']}",
        f"batch       {r['batch']}; {r['warmup']} warm-up + {r['steps']} timed steps per variant, alternating",
        f"baseline    eager {'fp16 AMP + GradScaler' if r['device'] == 'cuda' else 'fp32'}, timm default attention, "
        "teacher every step, torch AdamW, clip 5",
        f"candidate   build_continual_pretrain + TorchBackend({r['precision']}) + "
        "build_optimizer(param_groups, fused=True)"
        + (" + torch.compile" if r["compile"] else "")
        + (" + grad checkpointing" if r["settings"].get("grad_checkpointing") else ""),
        "",
        f"{'variant':<10} {'step s (median)':>15} {'IQR':>5} {'min':>7} {'images/s':>9} {'fwd s':>7} {'bwd s':>7} "
        f"{'opt s':>7} {'state MiB':>10} {'step MiB':>9} {'peak MiB':>9} {'GFLOP/s':>9} {'1st loss':>9}",
    ]
    for key in ("baseline", "candidate"):
        v = r[key]
        ph = v["phases_s_median"]
        lines.append(
            f"{key:<10} {v['step_s_median']:>15.3f} {v['step_s_stats']['iqr_rel']:>5.0%} {v['step_s_min']:>7.3f} "
            f"{v['images_per_s']:>9.2f} "
            f"{ph['forward']:>7.3f} {ph['backward']:>7.3f} {ph['optimizer']:>7.3f} "
            f"{_mib(v['state_bytes']):>10} {_mib(v['step_mem_bytes']):>9} {_mib(v['peak_mem_bytes']):>9} "
            f"{v['achieved_flops_per_s'] / 1e9:>9.1f} {v['first_loss']:>9.4f}"
        )
    mfu = (
        "n/a on CPU"
        if r["device"] != "cuda"
        else (
            f"{r['mfu']:.1%} of {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 (target >= {TARGET_MFU:.0%})"
            if r["mfu"] is not None
            else r["mfu_note"]
        )
    )
    b_peak, c_peak = r["baseline"]["peak_mem_bytes"], r["candidate"]["peak_mem_bytes"]
    ceiling = r["matmul_ceiling"]
    lines += [
        "",
        f"speedup     {r['speedup']:.2f}x images/s, candidate over baseline, median steps "
        f"(target >= {r['target_speedup']}x: {'met' if r['meets_target'] else 'NOT met'}); "
        f"{r['speedup_fastest_steps']:.2f}x fastest over fastest step",
        f"memory      peak {_mib(c_peak)} MiB vs {_mib(b_peak)} MiB"
        + (f" ({c_peak / b_peak:.2f}x)" if b_peak and c_peak else "")
        + f"; {r['memory_method']}",
        f"FLOPs/step  {r['flops_per_step'] / 1e12:.3f} TFLOP (FlopCounterMode, candidate fwd + bwd); "
        f"achieved {r['candidate']['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s candidate, "
        f"{r['baseline']['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s baseline",
        f"ceiling     {ceiling.get('precision', 'bf16')} matmul {ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s "
        "on this machine "
        f"({r['matmul_ceiling']['what']}); candidate at {r['candidate_share_of_ceiling']:.1%} of it",
        f"MFU         {mfu}",
    ]
    if r["compile_s"] is not None:
        lines.append(f"compile     {r['compile_s']:.1f} s (first warm-up step minus the median step)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
