"""Tiny params for the Dagster tests: the demo preset with every path in a tmp folder and a few steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orchestration.resources import GfmParams, MlflowTracking, PretrainLauncher

TEACHER = "tf_efficientnet_lite0.safetensors"


def write_params(repo_root: Path, tmp: Path, *, tasks: tuple[str, ...] = ("scene", "change"),
                 models: tuple[str, ...] = ("gfm", "imagenet", "random"), edit: Callable[[dict], Any] | None = None,
                 **validate: Any) -> Path:
    """``params.yaml`` of the demo preset with every path under ``tmp`` and budgets of a few steps."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["demo_data"]["root"] = str(tmp / "demo")
    raw["retrain"]["teacher_dir"] = str(tmp / "teachers")
    raw["tracking"].update(uri=f"sqlite:///{tmp}/mlflow.db", artifacts=str(tmp / "mlartifacts"))
    demo = raw["presets"]["demo"]
    demo["ingest"].update(root=str(tmp / "demo" / "pile"), out_dir=str(tmp / "geopile"))
    demo["ingest"].setdefault("settings", {})["workers"] = 0
    demo["validate"].update(validate)
    demo["pretrain"]["teacher"]["checkpoint"] = str(tmp / "demo" / "teacher" / TEACHER)
    demo["pretrain"].update(out_dir=str(tmp / "pretrain"), batch_size=4, max_steps=2, log_every=1,
                            checkpoint_every=2, teacher_pool=16, holdout_crops=8)
    ft = demo["finetune"]
    for task in ft["tasks"]:  # every task's root: the contamination check reads all test splits
        task["root"] = str(tmp / "demo" / "tasks" / task["name"])
    ft["tasks"] = [t for t in ft["tasks"] if t["name"] in tasks]
    # the models' weights are derived from the pretrain section above (its export, teacher, student, ablations)
    ft["models"] = [m for m in raw["finetune"]["models"] if m["name"] in models]
    ft["ablations"] = [a for a in raw["pretrain"]["ablations"] if a in models]
    ft.update(seeds=[0], epochs=1, warmup_epochs=0, max_steps=2, out_dir=str(tmp / "finetune"))
    demo["evaluate"].update(n_bootstrap=50, out_dir=str(tmp / "evaluate"))
    demo["evaluate"]["arp_exclude"] = {t: why for t, why in demo["evaluate"].get("arp_exclude", {}).items()
                                       if t in tasks}
    if "gfm" in models and "imagenet" not in models:
        demo["evaluate"].update(baseline="gfm", reference="gfm")
    if edit is not None:
        edit(raw)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def resources(path: Path, **launcher: Any) -> dict[str, Any]:
    """The three resources over a params file (MLflow from the file's tracking section)."""
    return {"gfm": GfmParams(params_path=str(path)), "mlflow": MlflowTracking(),
            "launcher": PretrainLauncher(**launcher)}
