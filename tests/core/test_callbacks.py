"""Callbacks that watch the logged metrics (the loop itself knows no metric names)."""

from __future__ import annotations

import logging

from gfm_core.training.callbacks import Callback, CollapseWarning


def test_collapse_warning_warns_once_below_the_threshold(caplog):
    cb = CollapseWarning(threshold=1e-3)
    assert isinstance(cb, Callback)
    with caplog.at_level(logging.WARNING, logger="gfm_core.training.callbacks"):
        cb.on_log(1, {"loss": 1.0})  # no embed_std: nothing to watch
        cb.on_log(2, {"loss": 1.0, "embed_std": 0.5})
        assert not caplog.records
        cb.on_log(3, {"loss": 1.0, "embed_std": 2e-4})
        cb.on_log(4, {"loss": 1.0, "embed_std": 1e-5})
    assert [r.getMessage() for r in caplog.records] == [
        "step 3: embed_std 0.0002 < 0.001: the embeddings may be collapsing"
    ]
    assert caplog.records[0].levelno == logging.WARNING


def test_collapse_warning_default_threshold():
    assert CollapseWarning().threshold == 1e-4
