"""The training loop with the plain torch backend: learning, logging, exact resume, checkpoints,
divergence."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from helpers.tiny_training import TinyRegression, make_loader_factory

from gfm_core.errors import CheckpointError, ConfigError, TrainingDivergedError
from gfm_core.training.backends import TorchBackend
from gfm_core.training.callbacks import CollapseWarning
from gfm_core.training.checkpoint import latest_checkpoint, list_checkpoints
from gfm_core.training.loop import Callback, LoopCfg, fit
from gfm_core.training.optim import param_groups
from gfm_core.training.schedule import lr_at


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention (60x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(out: Path, **kw) -> LoopCfg:
    base = dict(
        total_steps=12,
        out_dir=out,
        base_lr=1e-2,
        warmup_lr=1e-3,
        min_lr=1e-3,
        warmup_steps=2,
        clip_grad=1.0,
        log_every=1,
        checkpoint_every=5,
        keep_checkpoints=None,
        progress=False,
    )
    return LoopCfg(**{**base, **kw})


def _run(out: Path, *, dropout=0.1, noise=0.05, callbacks=(), model_seed=0, poison_at=None, **kw):
    cfg = _cfg(out, **kw)
    model = TinyRegression(dropout=dropout, seed=model_seed)
    loaders = make_loader_factory(8, noise=noise, poison_at=poison_at)  # 64 rows -> 8 micro-batches per epoch
    result = fit(model, loaders, TorchBackend("cpu"), cfg, param_groups(model, weight_decay=0.05), callbacks)
    return result, model


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.started: list[int] = []
        self.stop_at = stop_at

    def on_start(self, step):
        self.started.append(step)

    def on_log(self, step, metrics):
        self.logged.append((step, metrics))
        if step == self.stop_at:
            raise KeyboardInterrupt(f"simulated crash after step {step}")

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, path))


def test_loss_falls_and_everything_is_logged(tmp_path):
    rec = Recorder()
    result, _ = _run(
        tmp_path,
        dropout=0.0,
        noise=0.0,
        total_steps=40,
        log_every=4,
        checkpoint_every=20,
        base_lr=5e-2,
        clip_grad=None,
        callbacks=[rec],
    )
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 10 and losses[-1] < 0.1 * losses[0], losses
    assert all(h["grad_norm"] > 0 for h in result.history)
    assert result.steps == 40
    assert set(result.metrics) == {
        "loss",
        "mse",
        "mae",
        "lr",
        "grad_norm",
        "images_per_s",
        "epoch",
    }  # no "output"
    last_lr = lr_at(39, total_steps=40, warmup_steps=2, base_lr=5e-2, warmup_lr=1e-3, min_lr=1e-3)
    assert result.metrics["lr"] == pytest.approx(
        last_lr
    )  # the 40th update uses lr_at(39), just above the floor
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(4, 41, 4))
    assert lines == [dict(r) for r in result.history]
    assert [s for s, _ in rec.logged] == list(range(4, 41, 4))
    assert [s for s, _ in rec.checkpoints] == [20, 40]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_000040" == rec.checkpoints[-1][1]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000040"


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # dropout + noise from the global RNG + grad accumulation + a checkpoint in the middle of an epoch
    kw = dict(grad_accum=2, total_steps=12, checkpoint_every=5)
    full, full_model = _run(tmp_path / "full", **kw)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", callbacks=[Recorder(stop_at=7)], **kw)
    assert latest_checkpoint(tmp_path / "cut").name == "step_000005"  # epoch 1, 2 micro-batches in
    logged = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 8))

    resumed, resumed_model = _run(
        tmp_path / "cut", model_seed=123, resume=True, **kw
    )  # other init: must be restored
    assert resumed.resumed_from == tmp_path / "cut" / "checkpoints" / "step_000005"
    assert [h["step"] for h in resumed.history] == list(range(6, 13))
    expected = {h["step"]: h["loss"] for h in full.history}
    for h in resumed.history:
        assert h["loss"] == expected[h["step"]], h["step"]  # bit-identical
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # metrics.jsonl: the steps logged after the checkpoint by the crashed run were replaced, not duplicated
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_fused_adamw_trains_like_the_default_and_resumes_exactly(tmp_path):
    kw = dict(grad_accum=2, total_steps=12, checkpoint_every=5)
    _, plain_model = _run(tmp_path / "plain", **kw)
    _, fused_model = _run(tmp_path / "fused", fused_optimizer=True, **kw)
    for a, b in zip(plain_model.state_dict().values(), fused_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same update rule, another kernel
    state = torch.load(tmp_path / "fused" / "checkpoints" / "step_000010" / "state.pt", weights_only=True)
    assert [g["fused"] for g in state["optimizer"]["param_groups"]] == [True, True]

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", callbacks=[Recorder(stop_at=7)], fused_optimizer=True, **kw)
    resumed, resumed_model = _run(tmp_path / "cut", model_seed=123, resume=True, fused_optimizer=True, **kw)
    assert [h["step"] for h in resumed.history] == list(range(6, 13))
    for a, b in zip(fused_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    first, _ = _run(tmp_path, total_steps=4, checkpoint_every=2)
    again, _ = _run(tmp_path, total_steps=4, checkpoint_every=2, resume=True)
    assert again.steps == 4 and again.history == []
    assert again.checkpoint == first.checkpoint
    assert again.metrics["loss"] == first.metrics["loss"]


def test_checkpoint_files_are_weights_only_and_pruned(tmp_path):
    _run(tmp_path, total_steps=8, checkpoint_every=2, keep_checkpoints=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    ckpt = tmp_path / "checkpoints" / "step_000008"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "client_state"}
    assert state["client_state"]["loop"]["step"] == 8
    rng = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["backend"] == "torch" and meta["step"] == 8
    assert (
        meta["client_state"]["loop"]["epoch"] == 0 and meta["client_state"]["loop"]["position"] == 8
    )  # lazy rollover


def test_half_written_checkpoints_are_ignored(tmp_path):
    _run(tmp_path, total_steps=4, checkpoint_every=2)
    root = tmp_path / "checkpoints"
    (root / "step_000099.tmp").mkdir()  # crashed while writing
    (root / "step_000099.tmp" / "state.pt").write_bytes(b"partial")
    (root / "step_000050").mkdir()  # no meta.json: not ours / incomplete
    assert latest_checkpoint(tmp_path) == root / "step_000004"
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    resumed, _ = _run(tmp_path, total_steps=6, checkpoint_every=2, resume=True)
    assert resumed.resumed_from == root / "step_000004"
    assert not (root / "step_000099.tmp").exists()  # cleaned up when the next checkpoint was pruned


def test_fresh_start_sets_an_earlier_run_aside_and_deletes_nothing(tmp_path, caplog):
    _run(tmp_path, total_steps=6, checkpoint_every=3)
    old_state = (tmp_path / "checkpoints" / "step_000006" / "state.pt").read_bytes()
    with caplog.at_level(logging.WARNING):
        result, _ = _run(tmp_path, total_steps=2, checkpoint_every=5, resume=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    assert result.resumed_from is None and result.start_step == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    aside = result.set_aside  # the earlier run, moved intact with its metrics and the reason
    assert aside.parent == tmp_path and aside.name.startswith("checkpoints.stale-")
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_000003", "step_000006"]
    assert (aside / "step_000006" / "state.pt").read_bytes() == old_state
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 6
    assert "resume is off" in json.loads((aside / "set_aside.json").read_text())["reason"]
    assert str(aside) in caplog.text
    again, _ = _run(tmp_path, total_steps=4, checkpoint_every=2, resume=True)  # never resumes a set-aside run
    assert again.resumed_from == tmp_path / "checkpoints" / "step_000002"


def test_only_a_checkpoint_of_the_same_run_is_continued(tmp_path):
    """The fingerprint (data, params, teacher hashes) is written with each checkpoint and compared on start."""
    import shutil

    run_a = {"data": "d1" * 32, "params_sha256": "p1", "teacher_sha256": "t1"}
    with pytest.raises(KeyboardInterrupt):  # killed after step 7; the last checkpoint is step 5
        _run(tmp_path / "a", fingerprint=run_a, callbacks=[Recorder(stop_at=7)])
    meta = json.loads((tmp_path / "a" / "checkpoints" / "step_000005" / "meta.json").read_text())
    assert meta["fingerprint"] == run_a
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    rec = Recorder()
    same, _ = _run(tmp_path / "a", fingerprint=run_a, resume=True, callbacks=[rec])
    assert same.start_step == 5 and rec.started == [5] and same.set_aside is None
    assert [h["step"] for h in same.history] == list(range(6, 13))
    assert "same data, params_sha256, teacher_sha256" in same.start_reason

    new_teacher = {**run_a, "teacher_sha256": "t2"}
    rec = Recorder()
    other, _ = _run(tmp_path / "b", fingerprint=new_teacher, resume=True, callbacks=[rec])
    assert other.start_step == 0 and rec.started == [0] and other.resumed_from is None
    assert [h["step"] for h in other.history] == list(range(1, 13))
    assert "teacher_sha256: t1 -> t2" in other.start_reason and "data" not in other.start_reason.split("(")[1]
    assert (other.set_aside / "step_000005" / "meta.json").is_file()  # kept, not deleted
    assert json.loads((other.set_aside / "set_aside.json").read_text())["reason"] == other.start_reason


def test_unfinished_mode_continues_an_interrupted_run_and_restarts_a_finished_one(tmp_path):
    fp = {"data": "d", "params_sha256": "p", "teacher_sha256": "t"}
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, total_steps=6, checkpoint_every=2, fingerprint=fp, callbacks=[Recorder(stop_at=3)])
    cont, _ = _run(tmp_path, total_steps=6, checkpoint_every=2, fingerprint=fp, resume="unfinished")
    assert cont.start_step == 2 and [h["step"] for h in cont.history] == [3, 4, 5, 6] and cont.set_aside is None
    records = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [1, 2, 3, 4, 5, 6]  # step 3 of the interrupted run was dropped, not duplicated

    again, _ = _run(tmp_path, total_steps=6, checkpoint_every=2, fingerprint=fp, resume="unfinished")
    assert again.start_step == 0 and [h["step"] for h in again.history] == [1, 2, 3, 4, 5, 6]
    assert "finished (step 6 of 6)" in again.start_reason
    assert (again.set_aside / "step_000006").is_dir()
    kept, _ = _run(tmp_path, total_steps=6, checkpoint_every=2, fingerprint=fp, resume=True)
    assert kept.start_step == 6 and kept.history == []  # resume=True leaves a finished run finished


def test_non_finite_loss_raises_before_the_update(tmp_path):
    model = TinyRegression()
    loaders = make_loader_factory(
        8, poison_at=6
    )  # micro-batch 6 (0-based) = optimizer step 7 with grad_accum 1
    before = {}

    class Snapshot(Callback):
        def on_log(self, step, metrics):
            before.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(TrainingDivergedError, match="non-finite loss at step 7") as err:
        fit(model, loaders, TorchBackend("cpu"), _cfg(tmp_path), param_groups(model, 0.05), [Snapshot()])
    assert err.value.step == 7
    assert not math.isfinite(err.value.components["loss"]) and "mae" in err.value.components
    for k, v in model.state_dict().items():  # step 7 was not applied: weights are those after step 6
        assert torch.equal(v, before[k]), k


def test_collapse_warning_is_a_callback_logged_once(tmp_path, caplog):
    class Collapsing(TinyRegression):
        def forward(self, batch):
            out = super().forward(batch)
            out["embed_std"] = torch.tensor(1e-6)
            return out

    def run(out, callbacks):
        model = Collapsing()
        cfg = _cfg(out, total_steps=3)
        fit(model, make_loader_factory(8), TorchBackend("cpu"), cfg, param_groups(model, 0.05), callbacks)

    with caplog.at_level(logging.WARNING, logger="gfm_core.training"):
        run(tmp_path / "plain", [])  # the loop itself knows no metric names
        assert "may be collapsing" not in caplog.text
        run(tmp_path / "watched", [CollapseWarning(threshold=1e-4)])
    assert caplog.text.count("may be collapsing") == 1
    assert "step 1: embed_std 1e-06 < 0.0001: the embeddings may be collapsing" in caplog.text


def test_contract_errors(tmp_path):
    class NoLoss(TinyRegression):
        def forward(self, batch):
            return {"mse": super().forward(batch)["mse"]}

    model = NoLoss()
    with pytest.raises(ConfigError, match="'loss'"):
        fit(model, make_loader_factory(8), TorchBackend("cpu"), _cfg(tmp_path), param_groups(model, 0.05))
    model = TinyRegression()
    with pytest.raises(ConfigError, match="yielded no batches"):
        fit(model, lambda epoch: [], TorchBackend("cpu"), _cfg(tmp_path / "b"), param_groups(model, 0.05))
    with pytest.raises(ConfigError, match="warmup_steps"):
        _cfg(tmp_path, warmup_steps=20)


def test_resume_with_changed_data_is_an_error(tmp_path):
    _run(tmp_path, total_steps=5, checkpoint_every=5)  # checkpoint at epoch 0, micro-batch 5 of 8
    model = TinyRegression()
    short = make_loader_factory(32)  # 2 batches per epoch
    with pytest.raises(CheckpointError, match="data or loader changed"):
        fit(model, short, TorchBackend("cpu"), _cfg(tmp_path, resume=True), param_groups(model, 0.05))


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    _run(tmp_path, total_steps=2, checkpoint_every=2)
    (tmp_path / "checkpoints" / "step_000002" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot restore training state"):
        _run(tmp_path, total_steps=4, resume=True)


def test_measurements_of_callbacks_join_each_logged_record(tmp_path):
    class Probe(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def measure(self, step):
            self.steps.append(step)
            return {"held_out": float(step) / 10}

    probe, rec = Probe(), Recorder()
    result, _ = _run(tmp_path, total_steps=6, log_every=3, callbacks=[probe, rec])
    assert probe.steps == [3, 6]  # at logged steps only
    assert [m["held_out"] for _, m in rec.logged] == [0.3, 0.6]  # before on_log sees the record
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["held_out"] for r in lines] == [0.3, 0.6] and result.metrics["held_out"] == 0.6
