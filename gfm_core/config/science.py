"""The science section: the small-scale test of the paper's claims and its evaluation sets."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from gfm_core.config.base import Section


class EvalSetCfg(Section):
    """A densely labelled evaluation set of the science experiment: image/mask pairs, read whole.

    Images are ``<root>/<split>/<images>/*`` (every split of ``splits`` pooled; ``splits: []`` = ``<root>``
    itself) and masks the same stem under ``<masks>``. Pixels are scaled with ``value_range``, area-averaged by
    ``downsample`` (labels by majority) and contrast-stretched with the set's own ``stretch`` percentiles (the
    rule the pile's sources get). ``mask_values[k]`` is the raw code of class ``k``; other codes are ignored.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    root: Path
    splits: tuple[str, ...] = ()
    images: str = "images"
    masks: str = "masks"
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    mask_values: tuple[int, ...] = Field(min_length=2)
    class_names: tuple[str, ...] | None = None
    downsample: int = Field(1, ge=1, description="area-average factor (FLAIR-2's 0.2 m -> 0.4 m: 2)")
    stretch: tuple[float, float] | None = (2.0, 98.0)
    block_size: int = Field(
        64, ge=4, description="spatial CV block edge in pixels (after downsampling); a multiple of the student's "
        "input size, so no feature of one block sees pixels of another",
    )
    margin: int = Field(8, ge=0, description="scored pixels keep this far from their block's edge")
    pixels_per_block: int = Field(64, ge=1, description="labelled pixels scored per block (fixed sample)")
    min_labelled: float = Field(0.25, gt=0, le=1, description="blocks with fewer labelled pixels are dropped")
    gsd_m: float | None = Field(None, gt=0, description="ground sample distance after downsampling (report)")


class ScienceCfg(Section):
    """The small-scale test of the paper's claims (``make science``; gfm_core.science).

    Every variant (``gfm`` and each of ``pretrain.ablations``, :meth:`Params.science_variants`) is a pretraining
    of the active ``pretrain`` section with its overrides, for ``steps`` optimizer steps, once per seed;
    ``random`` (the student's initial weights) is scored too.
    """

    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=2)
    steps: int = Field(1500, ge=1, description="optimizer steps of every pretraining (fixed; never wall time)")
    curve_fractions: tuple[float, ...] = Field((0.25, 0.5, 1.0), description="H4: probe gfm/mim_only here")
    eval_sets: tuple[EvalSetCfg, ...] = ()
    student_levels: tuple[int, ...] = Field((0, 1, 2, 3), description="0-based stages probed (upsampled)")
    teacher_levels: tuple[int, ...] = Field((2, 3, 4), description="the teacher's feature levels probed")
    folds: int = Field(5, ge=2)
    probe_weight_decay: float = Field(1e-3, ge=0)
    probe_iters: int = Field(100, ge=1)
    n_bootstrap: int = Field(2000, ge=100)
    ci: float = Field(0.95, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    relevance_margin: float = Field(2.0, ge=0, description="points the teacher must beat raw and MIM-only by")
    h4_margin: float = Field(
        1.0, ge=0, description="H4 'reaches': GFM at half the FLOPs is within this many points of MIM-only's final"
    )
    seed: int = 0
    out_dir: Path = Path("outputs/science")

    @model_validator(mode="after")
    def _check(self) -> ScienceCfg:
        if any(not 0 < f <= 1 for f in self.curve_fractions) or 1.0 not in self.curve_fractions:
            raise ValueError(f"science.curve_fractions must lie in (0, 1] and include 1, got {self.curve_fractions}")
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"science.eval_sets: duplicate names in {names}")
        return self
