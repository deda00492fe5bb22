"""The backbone as an MLflow pyfunc model from code: log and register it, load it back as a timm model."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfm_core.errors import CheckpointError, ConfigError
from gfm_core.io import sha256_file
from gfm_core.tracking.card import card_markdown, model_card
from gfm_core.tracking.runs import import_mlflow

log = logging.getLogger(__name__)

ARTIFACT_DIR = "backbone"

#: The pyfunc model's code (MLflow "models from code": this file is stored with the model, nothing is pickled).
#: Self-contained: it imports only what the model's requirements list (MODEL_REQUIREMENTS + mlflow), never
#: gfm_core, so the model serves from an environment built from its own requirements.txt.
MODEL_CODE = '''"""gfm-foundation backbone as an MLflow pyfunc: [B, C, H, W] float32 -> pooled [B, D] features.

Needs torch, torchvision, timm, safetensors, numpy and mlflow only (see requirements.txt).
"""
import hashlib
import json

import mlflow
import numpy as np


class GfmBackbone(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import timm
        from safetensors.torch import load_file

        path = context.artifacts["backbone"]
        with open(context.artifacts["sidecar"]) as f:
            side = json.load(f)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if side.get("weights_sha256") not in (None, h.hexdigest()):
            raise ValueError(f"{path}: sha256 {h.hexdigest()} is not the sidecar's {side['weights_sha256']}")
        model = timm.create_model(side["arch"], pretrained=False, **side["timm_kwargs"])
        model.load_state_dict(load_file(path), strict=True)
        self.model = model.eval()

    def predict(self, context, model_input, params=None):
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.model(x).numpy()


mlflow.models.set_model(GfmBackbone())
'''
#: What :data:`MODEL_CODE` imports besides mlflow (timm imports torchvision), pinned to the installed versions,
#: which pyproject.toml pins.
MODEL_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy")


def _signature(card: Mapping[str, Any]) -> Any:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = card.get("input_size") or [3, -1, -1]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *[int(s) for s in size]))]))


def register_backbone(
    backbone: Path, model_name: str, tags: Mapping[str, str], *, card: Mapping[str, Any] | None = None
) -> str:
    """Log the backbone as a pyfunc model (with its model card) to the active run, register it; returns the version.

    The version's source is ``<run artifacts>/backbone``; its description is the model card. Its tag
    ``gfm.weights_sha256`` is the sha256 of the weight file as logged (what the promotion gate compares with
    the evaluated bytes). The model is self-contained (:data:`MODEL_CODE`, :data:`MODEL_REQUIREMENTS`).
    """
    mlflow = import_mlflow()
    run = mlflow.active_run()
    if run is None:
        raise ConfigError("register_backbone needs an active MLflow run (use tracking.stage_run)")
    backbone = Path(backbone)
    sidecar = backbone.with_suffix(".json")
    for f in (backbone, sidecar):
        if not f.is_file():
            raise CheckpointError(f"{f}: exported backbone file not found (run `gfm pretrain` first)")
    card = dict(card) if card is not None else model_card(backbone)
    import importlib.metadata as md

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="gfm-model-") as tmp:
        code = Path(tmp) / "gfm_backbone_model.py"
        code.write_text(MODEL_CODE)
        model_dir = Path(tmp) / ARTIFACT_DIR
        reqs = [f"{p}=={md.version(p)}" for p in MODEL_REQUIREMENTS]
        with warnings.catch_warnings():  # "add type hints" / "no input example": the signature is explicit
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(model_dir), python_model=str(code), signature=_signature(card), pip_requirements=reqs,
                artifacts={"backbone": str(backbone), "sidecar": str(sidecar)},
            )
        (model_dir / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (model_dir / "model_card.md").write_text(card_markdown(card, model_name))
        logged = sha256_file(model_dir / "artifacts" / backbone.name)  # the bytes registered, not the source's
        mlflow.log_artifacts(str(model_dir), artifact_path=ARTIFACT_DIR)
    tags = dict(tags)
    if tags.get("gfm.weights_sha256", logged) != logged:
        log.warning("%s changed while it was registered: the version is tagged with the logged bytes' sha256",
                    backbone)
    tags["gfm.weights_sha256"] = logged
    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):  # already registered
        client.create_registered_model(model_name, description="GFM foundation backbones (timm, safetensors)")
    version = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run.info.run_id, tags=tags,
        description=card_markdown(card, model_name)[:5000],
    )
    return str(version.version)


def load_registered_backbone(uri: str) -> Any:
    """A timm backbone from a registry URI such as ``models:/gfm-foundation@champion``."""
    from gfm_core.models.weights import load_backbone

    local = Path(import_mlflow().artifacts.download_artifacts(uri))
    files = sorted(local.rglob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{uri}: no .safetensors backbone among the registered artifacts ({local})")
    return load_backbone(files[0])
