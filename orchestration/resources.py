"""Dagster resources: the params file, and how pretraining is launched. No ML code here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from gfm_core import stages
from gfm_core.config import Params, load_params


class GfmParams(dg.ConfigurableResource):
    """``params.yaml`` and the preset in force (None = the file's own ``preset`` key, '' = the paper's values)."""

    params_path: str = "params.yaml"
    preset: str | None = None

    def load(self) -> Params:
        """The validated params (a bad key fails here, naming the file and the key)."""
        return load_params(self.params_path, preset=self.preset)


class PretrainLauncher(dg.ConfigurableResource):
    """Runs pretraining: in this process (the demo), or as a ``torchrun``/``deepspeed`` job on this node's GPUs.

    The asset code is the same either way: both return the stage's result read back from its output folder.
    """

    mode: Literal["in_process", "torchrun", "deepspeed"] = "in_process"
    nproc_per_node: int = 1

    def command(self, gfm: GfmParams, baseline: str | None = None) -> list[str]:
        """The launcher command line for ``mode`` (multi-node: see the README's hostfile section)."""
        cli = ["-m", "gfm_core.cli", "pretrain", "--params", gfm.params_path]
        if gfm.preset is not None:
            cli += ["--preset", gfm.preset]
        if baseline:
            cli += ["--baseline", baseline]
        bin_dir = Path(sys.executable).parent
        if self.mode == "torchrun":
            return [str(bin_dir / "torchrun"), f"--nproc_per_node={self.nproc_per_node}", *cli]
        ds = [str(bin_dir / "deepspeed"), f"--num_gpus={self.nproc_per_node}", "--no_local_rank", "--module"]
        return [*ds, *cli[1:]]

    def pretrain(
        self, context: dg.AssetExecutionContext, gfm: GfmParams, baseline: str | None = None
    ) -> tuple[Path, dict[str, Any]]:
        """Run one pretraining; returns the exported backbone and the run's ``summary.json``."""
        params = gfm.load()
        cfg = stages.baseline_params(params, baseline).pretrain if baseline else params.pretrain
        if self.mode == "in_process":
            if baseline:
                stages.run_pretrain_baseline(params, baseline)
            else:
                stages.run_pretrain(params)
        else:
            cmd = self.command(gfm, baseline)
            context.log.info("launching: %s", " ".join(cmd))
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:  # stream the job's log into the Dagster run
                context.log.info(line.rstrip())
            if proc.wait() != 0:
                raise dg.Failure(f"pretraining job failed (exit {proc.returncode}): {' '.join(cmd)}")
        return cfg.out_dir / "backbone.safetensors", json.loads((cfg.out_dir / "summary.json").read_text())
