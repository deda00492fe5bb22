"""The whole ``params.yaml``: every section, presets, and the loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from gfm_core.config.base import Section, _deep_merge, _format_error
from gfm_core.config.compute import ComputeCfg
from gfm_core.config.data import DemoDataCfg, IngestCfg, ValidateCfg
from gfm_core.config.downstream import BackboneSpec, EvaluateCfg, FinetuneCfg, TaskCfg, derive_models
from gfm_core.config.inference import InferenceCfg
from gfm_core.config.pretrain import PretrainCfg
from gfm_core.config.registry import PromoteCfg, RetrainCfg, TrackingCfg
from gfm_core.config.science import ScienceCfg
from gfm_core.config.sets import apply_sets
from gfm_core.errors import ConfigError, DataValidationError


class Params(Section):
    """The whole ``params.yaml`` after the active preset is applied."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    preset: str | None = None
    seed: int = 0
    demo_data: DemoDataCfg = DemoDataCfg()
    ingest: IngestCfg = IngestCfg()
    validation: ValidateCfg = Field(ValidateCfg(), alias="validate")  # `validate` is a BaseModel method
    pretrain: PretrainCfg = PretrainCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    tracking: TrackingCfg = TrackingCfg()
    promote: PromoteCfg = PromoteCfg()
    retrain: RetrainCfg = RetrainCfg()
    science: ScienceCfg = ScienceCfg()
    compute: ComputeCfg = ComputeCfg()
    inference: InferenceCfg = InferenceCfg()
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sets: tuple[str, ...] = Field((), description="the -S key=value overrides applied (recorded by the loader)")

    @model_validator(mode="before")
    @classmethod
    def _derive_models(cls, data: Any) -> Any:
        return derive_models(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_exclusions(self) -> Params:
        unknown_ablations = sorted(set(self.finetune.ablations) - set(self.pretrain.ablations))
        if unknown_ablations:
            raise ValueError(f"finetune.ablations: {unknown_ablations} not in pretrain.ablations "
                             f"({', '.join(self.pretrain.ablations) or 'none'})")
        tasks = [t.name for t in self.finetune.tasks]
        unknown = sorted(set(self.validation.contamination_exclude) - set(tasks))
        if unknown:
            raise ValueError(
                f"validate.contamination_exclude: unknown task name(s) {unknown}; finetune.tasks are: "
                f"{', '.join(tasks) or '(none)'}"
            )
        self._check_pooled_rows()
        return self

    def task(self, name: str) -> TaskCfg:
        """The task section named ``name``, with its ``stretch`` set from its ``stretch_source``'s recorded
        contrast stretch (``<ingest.out_dir>/norm_stats.json``).

        Raises:
            ConfigError: no such task (the message lists the configured ones).
            DataValidationError: ``stretch_source`` is set but the pile has no stretch of that source yet.
        """
        for t in self.finetune.tasks:
            if t.name == name:
                return self._with_pile_stretch(t)
        valid = ", ".join(t.name for t in self.finetune.tasks) or "(none configured)"
        raise ConfigError(f"finetune.tasks: unknown task {name!r}; valid: {valid}")

    def _with_pile_stretch(self, task: TaskCfg) -> TaskCfg:
        if task.stretch_source is None:
            return task
        from gfm_core.data.ingest.stats import load_stretches

        path = self.ingest.out_dir / "norm_stats.json"
        stretches = load_stretches(path) if path.is_file() else {}
        if task.stretch_source not in stretches:
            raise DataValidationError(
                f"{path}: no contrast stretch of pile source {task.stretch_source!r} (finetune.tasks[{task.name}]."
                f"stretch_source); run `gfm ingest` with ingest.stretch set, or drop stretch_source"
            )
        st = stretches[task.stretch_source]
        return task.model_copy(update={"stretch": (st.lo, st.hi)})

    def science_variants(self) -> dict[str, dict[str, Any]]:
        """The science experiment's pretrainings: ``gfm`` (the section as written) and ``pretrain.ablations``.

        Raises:
            ConfigError: an ablation the hypotheses compare is missing, or an ablation changes more than the loss
                weights (that would break the variants' common random numbers).
        """
        missing = sorted({"mim_only", "distill_only"} - set(self.pretrain.ablations))
        if missing:
            raise ConfigError(f"pretrain.ablations must define {missing} (the science hypotheses compare them)")
        for name, over in self.pretrain.ablations.items():
            extra = sorted(set(over) - {"w_mim", "alpha"})
            if extra:
                raise ConfigError(f"pretrain.ablations.{name}: the science experiment lets only w_mim and alpha "
                                  f"differ between variants, not {extra}")
        return {"gfm": {}, **self.pretrain.ablations}

    def model(self, name: str) -> BackboneSpec:
        """The model (backbone source) named ``name``.

        Raises:
            ConfigError: no such model (the message lists the configured ones).
        """
        for m in self.finetune.models:
            if m.name == name:
                return m
        valid = ", ".join(m.name for m in self.finetune.models) or "(none configured)"
        raise ConfigError(f"finetune.models: unknown model {name!r}; valid: {valid}")

    def _check_pooled_rows(self) -> None:
        """``evaluate.pretraining_seeds``: members are finetune models, each in one row of at least two."""
        models = {m.name for m in self.finetune.models}
        seen: dict[str, str] = {}
        for row, members in self.evaluate.pretraining_seeds.items():
            where = f"evaluate.pretraining_seeds.{row}"
            if len(members) < 2:
                raise ValueError(f"{where}: pools {len(members)} model(s); a pooled row needs two or more runs")
            if row in models and row not in members:
                raise ValueError(f"{where}: {row!r} is also a finetune model; name the pooled row otherwise")
            for m in members:
                if m not in models:
                    raise ValueError(f"{where}: {m!r} is not in finetune.models ({sorted(models)})")
                if m in seen:
                    raise ValueError(f"{where}: {m!r} is already pooled into {seen[m]!r}")
                seen[m] = row


def _preset_overrides(presets: dict[str, Any], name: str, source: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's overrides, on top of those of the preset it ``extends`` (recursively)."""
    overrides = presets.get(name)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: presets.{name}: expected a mapping")
    base = overrides.get("extends")
    overrides = {k: v for k, v in overrides.items() if k != "extends"}
    if base is None:
        return overrides
    if base in seen or base == name:
        raise ConfigError(f"{source}: presets.{name}.extends: a cycle through {' -> '.join((*seen, name, base))}")
    if base not in presets:
        valid = ", ".join(sorted(presets))
        raise ConfigError(f"{source}: presets.{name}.extends: unknown preset {base!r}; valid: {valid}")
    return _deep_merge(_preset_overrides(presets, base, source, (*seen, name)), overrides)


def parse_params(raw: dict[str, Any], *, source: str = "params", preset: str | None = None,
                 overrides: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> Params:
    """Validate a raw mapping, applying ``preset`` (or the mapping's own ``preset`` key), ``overrides``, then
    ``sets``.

    ``overrides`` are params data too (e.g. :func:`teacher_overrides`), merged before validation, so everything
    derived from them (the ``imagenet`` model from the teacher) follows. ``sets`` are ``-S key=value`` strings
    (:mod:`gfm_core.config.sets`), applied last and recorded in ``Params.sets``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    name = preset if preset is not None else raw.get("preset")
    presets = raw.get("presets") or {}
    merged = dict(raw)
    if name:
        if name not in presets:
            valid = ", ".join(sorted(presets)) or "(none defined)"
            raise ConfigError(f"{source}: preset: unknown preset {name!r}; valid presets: {valid}")
        merged = _deep_merge(raw, _preset_overrides(presets, name, source))
    if overrides:
        merged = _deep_merge(merged, overrides)
    recorded = tuple(merged.pop("sets", None) or ())  # a dump of Params carries the sets it was made with
    merged = apply_sets(merged, sets)
    merged["preset"] = name or None
    merged["sets"] = (*recorded, *sets)
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_error(source + (f" (preset {name!r})" if name else ""), e)) from None


def teacher_overrides(checkpoint: str | Path | None = None, arch: str | None = None) -> dict[str, Any]:
    """Overrides that swap the pretraining teacher (a retraining run on a newly released one); {} for none."""
    teacher = {k: str(v) for k, v in (("checkpoint", checkpoint), ("arch", arch)) if v is not None}
    return {"pretrain": {"teacher": teacher}} if teacher else {}


def load_params(path: str | Path = "params.yaml", preset: str | None = None,
                overrides: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> Params:
    """Load and validate ``params.yaml`` (``preset``, ``overrides``, then ``-S`` ``sets``); errors name the file, key
    and problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found (pass --params PATH)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw or {}, source=str(path), preset=preset, overrides=overrides, sets=sets)
