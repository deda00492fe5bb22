"""The MLflow sections: tracking, promotion in the registry, and scheduled or teacher-triggered retraining."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from gfm_core.config.base import Section


class TrackingCfg(Section):
    """MLflow: the default store is sqlite + local artifacts under ``outputs/``; a server is one URI away."""

    enabled: bool = True
    uri: str = Field("sqlite:///outputs/mlflow/mlflow.db", description="tracking URI (http://host:5000 for a server)")
    artifacts: Path = Path("outputs/mlflow/artifacts")
    experiment: str = "gfm-pipeline"


class PromoteCfg(Section):
    """Registry promotion: the alias moves only when the candidate passes the evaluation gate."""

    model_name: str = "gfm-foundation"
    alias: str = "champion"
    candidate: str = Field("gfm", description="the finetune.models entry that is the foundation model")
    must_beat: tuple[str, ...] | None = Field(
        None, description="models whose ARP the candidate must beat; None = every other evaluated model"
    )
    min_gain: float = Field(0.0, ge=0, description="ARP points the candidate must gain over the champion")
    require_complete: bool = Field(True, description="refuse when the evaluation misses results")


class RetrainCfg(Section):
    """When the pipeline retrains itself (Dagster schedule and teacher sensor)."""

    cron: str = Field("0 3 * * 0", description="retraining schedule (cron, UTC); default Sundays 03:00")
    teacher_dir: Path = Field(Path("weights/teachers"), description="a new checkpoint here triggers a retrain")
    teacher_patterns: tuple[str, ...] = ("*.safetensors", "*.pth", "*.pt")
    timm_patterns: tuple[str, ...] | None = Field(
        None, description="timm.list_pretrained patterns to watch for new ImageNet weights after a timm "
        "upgrade; None = the teacher's own arch (`<pretrain.teacher.arch>*`), [] = off",
    )
