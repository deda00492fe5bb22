"""Kill -9 drill: a Dagster pretraining killed at a random step, re-materialised, must resume from its last checkpoint.

    .venv/bin/python scripts/kill_resume_drill.py [--trials 5] [--steps 8] [--seed 0] [--workdir DIR]

On the demo preset (tiny Swin student, EfficientNet-Lite0 teacher, batch 4, a 32-view teacher pool and 8
held-out crops, as the tests use) with every path under ``--workdir``
(a temporary folder by default) and a Dagster instance configured like ``make env``'s (pool ``gfm_pretrain``
limited to 1):

1. materialises the demo data, manifest (+ its check) and shards once, then an uninterrupted ``foundation_model``
   (the reference);
2. per trial, materialises ``foundation_model`` in a child process, ``kill -9``'s it once a random step after
   the first checkpoint has been logged, marks the dead run failed and frees its pool slot
   (:func:`orchestration.materialize.reap_dead_runs`), and materialises ``foundation_model`` again in this
   process;
3. checks that the re-materialisation started at the last complete checkpoint the killed run left
   (``start_step`` metadata), logged every step exactly once, and ended with weights identical to the reference.

Prints one line per trial and ``N of N resumed from the last checkpoint``; exit status 1 if any trial did not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_params(work: Path, out_dir: Path, steps: int, checkpoint_every: int) -> Path:
    """The demo preset with every path under ``work`` and pretraining into ``out_dir``."""
    from gfm_core.stages import TEACHER_FILE

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["demo_data"]["root"] = str(work / "demo")
    raw["retrain"]["teacher_dir"] = str(work / "teachers")
    raw["tracking"].update(uri=f"sqlite:///{work}/mlflow.db", artifacts=str(work / "mlartifacts"))
    demo = raw["presets"]["demo"]
    demo["ingest"].update(root=str(work / "demo" / "pile"), out_dir=str(work / "geopile"))
    demo["pretrain"]["teacher"]["checkpoint"] = str(work / "demo" / "teacher" / TEACHER_FILE)
    demo["pretrain"].update(out_dir=str(out_dir), batch_size=4, max_steps=steps, log_every=1,
                            checkpoint_every=checkpoint_every, teacher_pool=32, holdout_crops=8)
    for task in demo["finetune"]["tasks"]:  # the contamination check reads every task's test split
        task["root"] = str(work / "demo" / "tasks" / task["name"])
    path = work / f"params_{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def materialize(names: list[str], params: Path) -> dict:
    """Materialise the named assets of ``orchestration.assets`` in this process; the last asset's metadata."""
    import dagster as dg

    from orchestration import assets as A
    from orchestration.resources import GfmParams, MlflowTracking, PretrainLauncher

    resources = {"gfm": GfmParams(params_path=str(params)), "mlflow": MlflowTracking(),
                 "launcher": PretrainLauncher()}
    res = dg.materialize([getattr(A, n) for n in names], resources=resources, instance=dg.DagsterInstance.get(),
                         raise_on_error=False)
    if not res.success:
        raise SystemExit(f"materialising {names} failed (run {res.run_id})")
    return {k: v.value for k, v in res.asset_materializations_for_node(names[-1])[0].metadata.items()}


def logged_steps(out_dir: Path) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError):  # a line being written
            break
    return steps


def trial(i: int, kill_after: int, work: Path, steps: int, every: int, reference: Path) -> tuple[bool, str, int]:
    """One kill and re-materialisation: (passed, report line, the step the re-materialisation started from)."""
    import dagster as dg
    import torch

    from gfm_core.io import load_weights
    from gfm_core.training.checkpoint import checkpoint_step, latest_checkpoint
    from orchestration.materialize import reap_dead_runs

    out = work / f"trial{i}"
    params = write_params(work, out, steps, every)
    child = subprocess.Popen([sys.executable, __file__, "--child", str(params)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(logged_steps(out)) < kill_after:
        if child.poll() is not None:
            return False, f"trial {i}: the child ended (exit {child.returncode}) before step {kill_after}", -1
        if time.time() > deadline:
            child.kill()
            return False, f"trial {i}: timed out", -1
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    seen = logged_steps(out)[-1]
    last = latest_checkpoint(out)
    k = checkpoint_step(last) if last else 0
    leftovers = sorted(p.name for p in (out / "checkpoints").glob("*.tmp"))
    reaped = reap_dead_runs(dg.DagsterInstance.get())

    meta = materialize(["foundation_model"], params)
    a, b = load_weights(reference), load_weights(out / "backbone.safetensors")
    same = a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    once = logged_steps(out) == list(range(1, steps + 1))
    ok = meta["start_step"] == k and k > 0 and same and once and len(reaped) == 1
    line = (f"trial {i}: killed after step {seen} was logged (target {kill_after}); last complete checkpoint "
            f"step {k}{'; half-written ' + ', '.join(leftovers) if leftovers else ''}; reaped {len(reaped)} dead "
            f"run; re-materialised from step {meta['start_step']}: "
            f"{'weights identical to the uninterrupted run' if same else 'WEIGHTS DIFFER'}, "
            f"{'every step logged once' if once else 'metrics.jsonl ' + str(logged_steps(out))}")
    return ok, line, int(meta["start_step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/kill_resume_drill.py", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of each pretraining")
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill steps")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:  # the process that gets killed
        materialize(["foundation_model"], args.child)
        return 0

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="gfm-kill-drill-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((REPO / "orchestration" / "dagster.yaml").read_text())
    os.environ["DAGSTER_HOME"] = str(home)  # the child processes inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"[drill] workdir {work}; {args.trials} trials of {args.steps} steps, checkpoint every "
          f"{args.checkpoint_every}", flush=True)
    t0 = time.time()
    reference = work / "reference"
    ref_params = write_params(work, reference, args.steps, args.checkpoint_every)
    materialize(["demo_data", "geopile_manifest", "great_expectations_suite", "geopile_shards"], ref_params)
    materialize(["foundation_model"], ref_params)
    print(f"[drill] data and the uninterrupted reference run ready ({time.time() - t0:.0f} s)", flush=True)

    rng = random.Random(args.seed)
    passed, starts = 0, []
    for i in range(1, args.trials + 1):
        kill_after = rng.randint(args.checkpoint_every + 1, args.steps - 1)
        ok, line, start = trial(i, kill_after, work, args.steps, args.checkpoint_every,
                                reference / "backbone.safetensors")
        passed += ok
        starts.append(str(start))
        print(f"[drill] {'ok  ' if ok else 'FAIL'} {line}", flush=True)
    print(f"[drill] {passed} of {args.trials} resumed from the last checkpoint (steps {', '.join(starts)}) with "
          f"weights identical to an uninterrupted run ({time.time() - t0:.0f} s)")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
