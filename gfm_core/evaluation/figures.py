"""Matplotlib figures without a display: one place that makes an Agg figure and writes it as a PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from gfm_core.io import write_bytes


def new_figure(width: float, height: float, dpi: int = 110) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, **savefig: Any) -> bytes:
    """The figure as PNG bytes (after ``tight_layout``)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    return buf.getvalue()


def write_png(fig: Any, path: str | Path) -> Path:
    """Write the figure as a PNG, atomically."""
    return write_bytes(path, png_bytes(fig))
