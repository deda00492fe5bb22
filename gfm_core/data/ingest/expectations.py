"""The Great Expectations suite of :func:`~gfm_core.data.ingest.validation.validate_manifest`, and running it.

One :class:`Rule` per check (the table in :mod:`~gfm_core.data.ingest.validation`): its expectation, the frame
it reads (``manifest`` or ``pile``), and how a failure is said in a sentence with a few offending examples.
Great Expectations is imported only when a suite is built or run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from gfm_core.data.ingest.sources import SourceSpec

MAX_EXAMPLES = 5
_GSD_TOLERANCE = 0.01  # as SourceSpec.gsd_in_range and build_manifest


Sentence = Callable[[int, int, Mapping[str, Any]], str]  # (unexpected, evaluated, GE result) -> text
Examples = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class Rule:
    """One check: its name, the frame it reads, its GE expectation, and how a failure is worded."""

    name: str
    frame: str  # "manifest" | "pile"
    expectation: Any
    sentence: Sentence
    examples: Examples | None = None  # None = offending paths with the column's value


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return str(value)


def row_examples(res: Mapping[str, Any], column: str, unit: str = "") -> list[str]:
    """A few offending manifest paths of a GE result, each with its value of ``column``."""
    out: list[str] = []
    for item in res.get("partial_unexpected_index_list") or []:
        if isinstance(item, dict) and "path" in item:
            value = item.get(column)
            shown = f"{value[:12]}..." if column == "sha256" and isinstance(value, str) else _fmt(value)
            out.append(f"{item['path']} ({column} = {shown}{unit})")
    return out[:MAX_EXAMPLES]


def _values(res: Mapping[str, Any]) -> str:
    vals = sorted({_fmt(v) for v in res.get("partial_unexpected_list") or []})
    return ", ".join(vals[:MAX_EXAMPLES]) or "?"


def _between(column: str, lo: float | None, hi: float | None, **kw: Any) -> Any:
    import great_expectations as gx

    return gx.expectations.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi, **kw)


def build_rules(
    df: Any,
    sources: Sequence[SourceSpec],
    *,
    min_size: int,
    max_nodata_fraction: float,
    max_bad_fraction: float,
    allowed_bands: Sequence[int],
    mean_range: tuple[float, float],
    quarantine_examples: list[str],
    bad: tuple[int, int],
    hashes: tuple[str, str],
) -> list[Rule]:
    """The suite, one :class:`Rule` per check, in report order.

    Args:
        df: the manifest frame (its ``mean_band<k>`` columns give the band-mean rules).
        sources: the configured sources (names, ``gsd_range``).
        min_size, max_nodata_fraction, max_bad_fraction, allowed_bands, mean_range: the thresholds.
        quarantine_examples: quarantine entries shown when the bad-fraction rule fails.
        bad: ``(quarantined files, all files)``.
        hashes: ``(quarantine.json's content hash, the manifest's)``.
    """
    return [
        *_image_rules(sources, min_size=min_size, max_nodata_fraction=max_nodata_fraction,
                      allowed_bands=allowed_bands),
        *_gsd_rules(sources),
        _unique_rule(),
        *_band_mean_rules(df, mean_range),
        *_pile_rules(max_bad_fraction, quarantine_examples, bad, hashes),
    ]


def _image_rules(
    sources: Sequence[SourceSpec], *, min_size: int, max_nodata_fraction: float, allowed_bands: Sequence[int]
) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    names = sorted(s.name for s in sources)
    allowed = sorted(int(b) for b in allowed_bands)
    allowed_txt = " or ".join(map(str, allowed))
    return [
        Rule(
            "not_empty",
            "manifest",
            E.ExpectTableRowCountToBeBetween(min_value=1),
            lambda n, t, r: (
                "the manifest lists no image (every file was quarantined, or the sources are empty)"
            ),
            lambda r: [],
        ),
        Rule(
            "known_source",
            "manifest",
            E.ExpectColumnValuesToBeInSet(column="source", value_set=names),
            lambda n, t, r: (
                f"{n} of {t} images come from source(s) {_values(r)} that are not configured "
                f"(configured: {', '.join(names)})"
            ),
        ),
        Rule(
            "allowed_bands",
            "manifest",
            E.ExpectColumnValuesToBeInSet(column="channels_read", value_set=allowed),
            lambda n, t, r: (
                f"{n} of {t} images are read with {_values(r)} band(s), but the model takes "
                f"{allowed_txt} (set the source's `bands`)"
            ),
        ),
        Rule(
            "min_size",
            "manifest",
            _between("short_side", min_size, None),
            lambda n, t, r: (
                f"{n} of {t} images are smaller than {min_size} px on their short side (the "
                f"training crop needs at least that)"
            ),
        ),
        Rule(
            "max_nodata",
            "manifest",
            _between("nodata_fraction", 0.0, max_nodata_fraction),
            lambda n, t, r: f"{n} of {t} images have more than {max_nodata_fraction:.1%} nodata pixels",
        ),
    ]


def _gsd_rules(sources: Sequence[SourceSpec]) -> list[Rule]:
    rules = []
    for spec in sorted(sources, key=lambda s: s.name):
        if spec.gsd_range is None:
            continue
        lo, hi = spec.gsd_range
        rules.append(
            Rule(
                f"gsd_range[{spec.name}]",
                "manifest",
                _between(
                    "gsd",
                    lo * (1 - _GSD_TOLERANCE),
                    hi * (1 + _GSD_TOLERANCE),
                    row_condition=f'source=="{spec.name}"',  # names are [A-Za-z0-9_.-]: safe to quote
                    condition_parser="pandas",
                ),
                cast(
                    Sentence,
                    lambda n, t, r, name=spec.name, lo=lo, hi=hi: (
                        f"{n} of {t} {name} images have a GSD outside "
                        f"the source's documented {lo:g}-{hi:g} m (wrong source folder, or a wrong CRS/transform)"
                    ),
                ),
                lambda r: row_examples(r, "gsd", " m"),
            )
        )
    return rules


def _unique_rule() -> Rule:
    import great_expectations as gx

    return Rule(
        "unique_sha256",
        "manifest",
        gx.expectations.ExpectColumnValuesToBeUnique(column="sha256"),
        lambda n, t, r: (
            f"{n} of {t} images share their bytes (sha256) with another row: exact "
            f"duplicates weigh twice in training"
        ),
    )


def _band_mean_rules(df: Any, mean_range: tuple[float, float]) -> list[Rule]:
    rules = []
    m_lo, m_hi = mean_range
    for col in (c for c in df.columns if c.startswith("mean_band")):
        k = col.removeprefix("mean_band")
        rules.append(
            Rule(
                f"band_mean[{k}]",
                "manifest",
                _between(col, m_lo, m_hi),
                cast(
                    Sentence,
                    lambda n, t, r, k=k: (
                        f"{n} of {t} images have a band-{k} mean outside {m_lo:g}-{m_hi:g} of "
                        f"the scaled range (blank or saturated images, or a wrong value_range for the source)"
                    ),
                ),
            )
        )
    return rules


def _pile_rules(
    max_bad_fraction: float, quarantine_examples: list[str], bad: tuple[int, int], hashes: tuple[str, str]
) -> list[Rule]:
    import great_expectations as gx

    n_bad, n_files = bad
    share = n_bad / n_files if n_files else 0.0
    return [
        Rule(
            "max_bad_fraction",
            "pile",
            _between("bad_fraction", 0.0, max_bad_fraction),
            lambda n, t, r: (
                f"{n_bad} of {n_files} files ({share:.1%}) were quarantined, over the limit of "
                f"{max_bad_fraction:.1%} (quarantine.json lists the reasons)"
            ),
            lambda r: quarantine_examples,
        ),
        Rule(
            "quarantine_matches",
            "pile",
            gx.expectations.ExpectColumnValuesToBeInSet(column="quarantine_matches", value_set=[True]),
            lambda n, t, r: (
                f"quarantine.json belongs to another manifest (its content hash "
                f"{hashes[0][:12] or '(none)'}, this manifest's {hashes[1][:12]}): re-run ingestion"
            ),
            lambda r: [],
        ),
    ]


# --------------------------------------------------------------------------------------------------- run


def gx_context(docs_dir: Path | None) -> Any:
    """An ephemeral GE context without progress bars; with a Data Docs site in ``docs_dir`` when given."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.update_data_docs_site(
            site_name="local_site",
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,  # type: ignore[typeddict-unknown-key]  # SiteBuilder takes it; GE's TypedDict lacks it
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def exception_message(info: Any) -> str | None:
    """The first exception message in a GE result's ``exception_info`` (flat or keyed by metric)."""
    if isinstance(info, dict):
        if info.get("raised_exception"):
            return str(info.get("exception_message"))
        for v in info.values():
            msg = exception_message(v)
            if msg:
                return msg
    return None


def run_suite(ctx: Any, name: str, frame: Any, rules: list[Rule]) -> list[tuple[Rule, Any]]:
    """Validate ``frame`` against ``rules`` as suite ``geopile_<name>``; each rule with its GE result."""
    import great_expectations as gx

    suite = ctx.suites.add(gx.ExpectationSuite(name=f"geopile_{name}"))
    for r in rules:
        r.expectation.meta = {"rule": r.name}
        suite.add_expectation(r.expectation)
    batch = (
        ctx.data_sources.add_pandas(f"geopile_{name}")
        .add_dataframe_asset(name=name)
        .add_batch_definition_whole_dataframe("all")
    )
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"geopile_{name}", data=batch, suite=suite)
    )
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    if "path" in frame.columns:
        result_format["unexpected_index_column_names"] = ["path"]
    cp = ctx.checkpoints.add(
        gx.Checkpoint(name=f"geopile_{name}", validation_definitions=[vd], result_format=result_format)
    )
    res = cp.run(batch_parameters={"dataframe": frame})
    by_rule = {}
    for vr in res.run_results.values():
        for er in vr.results:
            by_rule[(er.expectation_config.meta or {}).get("rule")] = er
    return [(r, by_rule[r.name]) for r in rules]
