"""The head table: every row has its head module and metrics classes, and the facts the pipeline reads."""

from __future__ import annotations

import pytest

from gfm_core.errors import ConfigError
from gfm_core.evaluation.metrics import METRICS
from gfm_core.models.heads import TASK_HEADS
from gfm_core.task_heads import HEADS, HeadRegistry, get_head


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_has_its_classes_and_facts(name):
    spec = get_head(name)
    assert TASK_HEADS.get(name).head == name and METRICS.get(name).head == name
    assert spec.headline in spec.columns and spec.layouts and spec.target in ("label", "mask", "target")
    assert ("folders" in spec.layouts) == bool(spec.dirs)  # the generic layout needs default folder names


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_metrics_class_recomputes_from_per_sample_statistics(name):
    """Each head's metrics class has its own from_stats (the bootstrap and the report depend on it)."""
    from gfm_core.evaluation.metrics import TaskMetrics

    assert METRICS.get(name).from_stats is not TaskMetrics.from_stats


def test_the_registries_hold_exactly_the_table():
    from gfm_core.data.tasks.samples import SAMPLE_READERS
    from gfm_core.evaluation.trivial import TRIVIAL_PREDICTORS

    tables = (TASK_HEADS, METRICS, TRIVIAL_PREDICTORS, SAMPLE_READERS)
    assert all(set(t.classes) == set(HEADS) for t in tables)


def test_registering_a_class_needs_a_row_and_only_once():
    reg: HeadRegistry[type] = HeadRegistry("thing")

    class Detection:
        head = "detection"

    with pytest.raises(ConfigError, match="unknown task head 'detection'; valid: change, classification"):
        reg.register(Detection)

    class Seg:
        head = "segmentation"

    reg.register(Seg)
    with pytest.raises(ConfigError, match="thing of head 'segmentation' registered twice"):
        reg.register(Seg)
    with pytest.raises(ConfigError, match="head 'change' has no thing class registered"):
        reg.get("change")
