"""Both backends behind one interface: torch (autocast bf16 on CPU) and DeepSpeed (gloo, 1 and 2
processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_training
from helpers.tiny_training import TinyRegression, make_loader_factory, train

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.training.backends import Backend, DeepSpeedBackend, TorchBackend, free_port, move_to
from gfm_core.training.checkpoint import latest_checkpoint
from gfm_core.training.loop import LoopCfg, fit
from gfm_core.training.optim import build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(tiny_training.__file__).resolve()
_LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(history):
    return [h["loss"] for h in history]


# ----------------------------------------------------------------------------------------------- torch


def test_torch_bf16_autocast_trains_on_cpu(tmp_path):
    backend = TorchBackend("cpu", precision="bf16")
    model = TinyRegression()
    backend.prepare(model, build_optimizer(param_groups(model, 0.05), lr=1e-2))
    out = backend.forward({"x": torch.randn(4, 8), "y": torch.randn(4, 4)})
    assert out["output"].dtype == torch.bfloat16  # matmuls ran in bf16
    assert out["loss"].dtype == torch.float32  # the objective computes its loss in fp32
    assert next(model.parameters()).dtype == torch.float32  # weights stay fp32

    result = train("torch", tmp_path, precision="bf16", steps=24, checkpoint_every=24, base_lr=5e-2)
    losses = _losses(result.history)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < 0.3 * sum(losses[:4]), losses


def test_torch_grad_accumulation_matches_one_big_batch(tmp_path):
    one = train("torch", tmp_path / "a", steps=4, global_batch=16, grad_accum=1)
    # 2 micro-batches of 8 = the same 16 rows per step (each epoch's permutation is fixed)
    two = train("torch", tmp_path / "b", steps=4, global_batch=8, grad_accum=2)
    assert _losses(two.history) == pytest.approx(_losses(one.history), rel=1e-5)
    assert [h["grad_norm"] for h in two.history] == pytest.approx(
        [h["grad_norm"] for h in one.history], rel=1e-5
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_request_without_gpu_raises_instead_of_falling_back():
    with pytest.raises(ConfigError, match=r"torch.cuda.is_available\(\) is False"):
        TorchBackend("cuda")


def test_precision_and_device_validation():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        TorchBackend("cpu", precision="fp16")
    with pytest.raises(ConfigError, match="unknown precision"):
        TorchBackend("cpu", precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown device"):
        TorchBackend("tpu")


@pytest.mark.parametrize("cls", [TorchBackend, DeepSpeedBackend])
def test_backends_implement_the_whole_protocol(cls):
    members = {n for n in vars(Backend) if not n.startswith("_")} | {"name"}
    assert {"prepare", "forward", "backward", "step", "save_checkpoint", "is_main"} <= members
    assert not {n for n in members if not hasattr(cls, n)}


def test_move_to_nested_batches():
    batch = {
        "x": torch.ones(2, dtype=torch.float32),
        "pair": (torch.zeros(1, dtype=torch.int64), [torch.ones(1)]),
        "name": "tile",
    }
    out = move_to(batch, torch.device("cpu"), float_dtype=torch.bfloat16)
    assert out["x"].dtype == torch.bfloat16 and out["pair"][0].dtype == torch.int64
    assert out["pair"][1][0].dtype == torch.bfloat16 and out["name"] == "tile"


# ----------------------------------------------------------------------------------------------- deepspeed


@pytest.mark.distributed
def test_deepspeed_trains_saves_and_resumes_exactly(tmp_path):
    kw = dict(steps=6, global_batch=8, grad_accum=2, zero_stage=1, checkpoint_every=3)
    full = train("deepspeed", tmp_path / "full", **kw)
    reference = train("torch", tmp_path / "torch", **kw)
    # same math as the plain torch loop (torch AdamW on ZeRO's flat partitions)
    assert _losses(full.history) == pytest.approx(_losses(reference.history), rel=1e-5)
    assert full.history[-1]["grad_norm"] > 0

    # simulate a crash after step 3: drop the later checkpoint, resume from step 3
    ckpt = tmp_path / "full" / "checkpoints" / "step_000003"
    assert (ckpt / "state" / "mp_rank_00_model_states.pt").is_file()
    assert (ckpt / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "step_000006")
    assert latest_checkpoint(tmp_path / "full") == ckpt
    resumed = train("deepspeed", tmp_path / "full", **kw, resume=True)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert _losses(resumed.history) == _losses(full.history)[3:]  # bit-identical

    # the torch backend cannot resume a DeepSpeed checkpoint: a clear error, not a crash deep in torch.load
    model = TinyRegression()
    cfg = LoopCfg(total_steps=8, out_dir=tmp_path / "full", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="written by the 'deepspeed' backend"):
        fit(model, make_loader_factory(8), TorchBackend("cpu"), cfg, param_groups(model, 0.05))


class _Planted:
    """A pickle that runs code when unpickled (``os.system``: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.distributed
def test_deepspeed_resume_refuses_a_planted_pickle(tmp_path):
    """Every file DeepSpeed reads back goes through torch.load(weights_only=True): code in a pickle never runs."""
    train("deepspeed", tmp_path / "run", steps=2, global_batch=8, zero_stage=1, checkpoint_every=2)
    state = tmp_path / "run" / "checkpoints" / "step_000002" / "state"
    files = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert sorted(p.name for p in state.glob("*.pt")) == files
    for name in files:  # the model file, then the ZeRO optimizer partition
        out = tmp_path / name.split("_")[0]
        shutil.copytree(tmp_path / "run", out)
        marker = tmp_path / f"pwned-{name}"
        torch.save({"module": _Planted(marker)}, out / "checkpoints" / "step_000002" / "state" / name)
        backend = DeepSpeedBackend("cpu", zero_stage=1)
        model = TinyRegression()
        cfg = LoopCfg(total_steps=4, out_dir=out, resume=True, progress=False)
        with pytest.raises(CheckpointError, match=rf"{name}: refused to load this DeepSpeed checkpoint file"):
            fit(model, make_loader_factory(8), backend, cfg, param_groups(model, 0.05))
        assert not marker.exists(), f"unpickling {name} ran code"


@pytest.mark.distributed
@pytest.mark.parametrize("bf16_mode", ["autocast", "native"])
def test_deepspeed_bf16_on_cpu(tmp_path, bf16_mode):
    backend = DeepSpeedBackend(
        "cpu", precision="bf16", zero_stage=2, bf16_mode=bf16_mode, micro_batch_size=16
    )
    assert backend.ds_config()["bf16"]["enabled"] is (bf16_mode == "native")
    model = TinyRegression()
    cfg = LoopCfg(
        total_steps=12,
        out_dir=tmp_path,
        base_lr=3e-2,
        warmup_lr=3e-3,
        min_lr=3e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=12,
        progress=False,
    )
    result = fit(model, make_loader_factory(16), backend, cfg, param_groups(model, 0.05))
    engine_dtype = next(backend.module.parameters()).dtype
    assert engine_dtype == (torch.bfloat16 if bf16_mode == "native" else torch.float32)
    losses = _losses(result.history)
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0], losses
    assert (tmp_path / "checkpoints" / "step_000012" / "state").is_dir()


@pytest.mark.distributed
def test_deepspeed_config_from_settings():
    backend = DeepSpeedBackend(
        "cpu",
        precision="fp32",
        zero_stage=2,
        micro_batch_size=4,
        config_overrides={"zero_optimization": {"overlap_comm": False}},
    )
    cfg = backend.ds_config(grad_accum=3, clip_grad=5.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert cfg["gradient_clipping"] == 5.0 and not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert "optimizer" not in cfg  # our torch AdamW is passed in: no JIT-built DeepSpeed Adam
    assert os.environ["DS_ACCELERATOR"] == "cpu" and os.environ["WORLD_SIZE"] == "1"
    assert backend.world_size == 1 and backend.is_main and backend.device == torch.device("cpu")


# ----------------------------------------------------------------------------------------------- 2 processes


def _launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return env


def _run_launcher(cmd: list[str], out: Path) -> list[dict]:
    proc = subprocess.run(cmd, env=_launch_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "history.json").read_text())


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [
        torchrun,
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        *args,
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend, zero_stage", [("deepspeed", 2), ("torch", 0)])
def test_two_process_gloo_run_matches_one_process(tmp_path, backend, zero_stage):
    """torchrun, 2 ranks x 8 rows = the 1-process run on 16 rows (same global batch, grad_accum 2)."""
    one = train(backend, tmp_path / "one", steps=6, global_batch=16, grad_accum=2, zero_stage=zero_stage)
    out = tmp_path / "two"
    args = [
        "--backend",
        backend,
        "--zero-stage",
        str(zero_stage),
        "--out",
        str(out),
        "--steps",
        "6",
        "--global-batch",
        "16",
        "--grad-accum",
        "2",
    ]
    two = _run_launcher(_torchrun(args), out)
    assert [h["step"] for h in two] == [1, 2, 3, 4, 5, 6]
    assert _losses(two) == pytest.approx(_losses(one.history), rel=1e-5)
    assert [h["grad_norm"] for h in two] == pytest.approx([h["grad_norm"] for h in one.history], rel=1e-4)
    meta = json.loads((out / "checkpoints" / "step_000006" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert (out / "checkpoints" / "step_000006" / "rng_rank1.pt").is_file()

    # resume the 2-process run from step 3: identical tail
    shutil.rmtree(out / "checkpoints" / "step_000006")
    resumed = _run_launcher(_torchrun([*args, "--resume"]), out)
    assert _losses(resumed) == _losses(two)[3:]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_two_processes(tmp_path):
    out = tmp_path / "ds"
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [
        launcher,
        "--num_gpus",
        "2",
        "--no_local_rank",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        "--backend",
        "deepspeed",
        "--zero-stage",
        "1",
        "--out",
        str(out),
        "--steps",
        "4",
        "--global-batch",
        "16",
    ]
    two = _run_launcher(cmd, out)
    one = train("deepspeed", tmp_path / "one", steps=4, global_batch=16, zero_stage=1)
    assert _losses(two) == pytest.approx(_losses(one.history), rel=1e-5)


def test_bf16_runs_in_fp32_on_a_cpu_without_bf16_kernels(monkeypatch, caplog):
    from gfm_core.config import FinetuneCfg
    from gfm_core.training.backends import base
    from gfm_core.training.setup import with_effective_precision

    monkeypatch.delenv("GFM_FORCE_BF16", raising=False)
    monkeypatch.setattr(base, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=base.__name__):
        assert base.effective_precision("bf16", "cpu") == "fp32"
    assert "no bf16 kernels" in caplog.text and "GFM_FORCE_BF16" in caplog.text
    assert [base.effective_precision(p, "cpu") for p in ("fp32", "fp16")] == ["fp32", "fp16"]
    assert base.effective_precision("bf16", "cuda") == "bf16"  # GPUs keep it
    cfg = FinetuneCfg(precision="bf16")
    assert with_effective_precision(cfg, "cpu").precision == "fp32" and cfg.precision == "bf16"
    monkeypatch.setenv("GFM_FORCE_BF16", "1")
    assert base.effective_precision("bf16", "cpu") == "bf16"
    monkeypatch.delenv("GFM_FORCE_BF16")
    monkeypatch.setattr(base, "cpu_has_fast_bf16", lambda: True)
    assert with_effective_precision(cfg, "cpu") is cfg


def test_the_bf16_kernel_probe_matches_the_isa():
    from gfm_core.training.backends.base import cpu_has_fast_bf16

    isa = torch.backends.cpu.get_cpu_capability()
    assert cpu_has_fast_bf16() == (isa not in ("DEFAULT", "NO AVX", "AVX2")), isa
