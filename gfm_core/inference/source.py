"""The backbone to apply: an exported ``backbone.safetensors`` (+ JSON sidecar) or a registry URI.

``models:/gfm-foundation@champion`` (an alias), ``models:/gfm-foundation/3`` (a version) or
``models:/gfm-foundation/latest`` are downloaded through MLflow (the tracking URI the caller configured,
:func:`gfm_core.tracking.configure`) and loaded with :func:`gfm_core.models.weights.load_backbone`, so the
sha256 in the sidecar is checked. The sidecar gives the band contract and the provenance written next to every
embedding (architecture, weights and teacher sha256, registry version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from gfm_core.errors import CheckpointError
from gfm_core.inference.bands import BandContract, contract_from_sidecar
from gfm_core.io import read_json, sidecar_path

REGISTRY_PREFIX = "models:/"


@dataclass(frozen=True)
class LoadedModel:
    """A backbone (pooled features: ``num_classes=0``), its band contract and provenance (``info``)."""

    model: nn.Module
    contract: BandContract
    info: dict[str, Any] = field(default_factory=dict)


def _provenance(side: dict[str, Any], path: Path) -> dict[str, Any]:
    teacher = dict((side.get("meta") or {}).get("teacher") or {})
    return {"arch": side.get("arch"), "weights_sha256": side.get("weights_sha256"),
            "teacher_sha256": teacher.get("sha256"), "teacher_arch": teacher.get("arch"), "weights": str(path)}


def load_exported(path: str | Path, **overrides: Any) -> LoadedModel:
    """An exported backbone file and its sidecar (``overrides`` replace sidecar timm kwargs).

    Raises:
        CheckpointError: the file or its sidecar is missing, or the weights do not match it.
    """
    from gfm_core.models.weights import load_backbone

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone file not found (an exported backbone.safetensors with its .json)")
    model = load_backbone(path, **overrides)
    side = read_json(sidecar_path(path))
    return LoadedModel(model, contract_from_sidecar(side, str(sidecar_path(path))), _provenance(side, path))


def _registry_version(uri: str) -> str | None:
    """The registry version ``uri`` points at now (alias, number or ``latest``), or None when it cannot tell."""
    from gfm_core.tracking.runs import import_mlflow

    name, _, rest = uri[len(REGISTRY_PREFIX):].partition("/")
    client = import_mlflow().MlflowClient()
    if "@" in name:
        name, alias = name.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    if rest.isdigit():
        return rest
    versions = client.search_model_versions(f"name='{name}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def load_registered(uri: str) -> LoadedModel:
    """A registered backbone (``models:/<name>@<alias>``, ``/<version>`` or ``/latest``).

    Raises:
        CheckpointError: the URI cannot be resolved or its artifacts hold no backbone.
    """
    from gfm_core.tracking.runs import import_mlflow

    mlflow = import_mlflow()
    try:
        version = _registry_version(uri)
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as e:  # MlflowException: unknown model, alias or version
        raise CheckpointError(
            f"{uri}: cannot resolve the registered model ({type(e).__name__}: {e}); without a champion use "
            f"models:/<name>/latest, and check the tracking URI (tracking.uri in params.yaml)"
        ) from e
    files = sorted(local.rglob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{uri}: no .safetensors backbone among the registered artifacts ({local})")
    loaded = load_exported(files[0])
    return LoadedModel(loaded.model, loaded.contract, {**loaded.info, "model_uri": uri, "model_version": version})


def load_model(ref: str | Path) -> LoadedModel:
    """A registry URI (``models:/...``) or the path of an exported backbone."""
    if str(ref).startswith(REGISTRY_PREFIX):
        return load_registered(str(ref))
    return load_exported(ref)
