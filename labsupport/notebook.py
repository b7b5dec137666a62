"""Conventions every notebook follows: smoke mode, and figures saved under ``results/``.

Each notebook's first code cell (tagged ``parameters`` so papermill can override it) reads
``smoke_mode()``: with ``LAB_SMOKE=1`` -- set by the test suite -- rounds and data shrink but every code
path still runs. :func:`save_figure` writes a figure to ``$LAB_RESULTS_DIR/figures`` when the labs run
headless (``make results``) and does nothing in an interactive session without that variable.
:func:`show_source` displays the code of a ``labsupport`` function where the reader should read it,
instead of a pasted copy.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["figure_path", "save_figure", "show_source", "smoke_mode"]

_TRUE = {"1", "true", "yes", "on"}


def smoke_mode() -> bool:
    """True when ``$LAB_SMOKE`` is set to 1/true/yes/on."""
    return os.environ.get("LAB_SMOKE", "").strip().lower() in _TRUE


def figure_path(name: str) -> Path | None:
    """Where :func:`save_figure` puts figure ``name``; ``None`` when ``$LAB_RESULTS_DIR`` is unset."""
    root = os.environ.get("LAB_RESULTS_DIR")
    return Path(root) / "figures" / f"{name}.png" if root else None


def save_figure(fig, name: str) -> None:
    """Save ``fig`` as ``$LAB_RESULTS_DIR/figures/<name>.png`` (nothing if the variable is unset).

    Returns nothing, so a notebook cell may end with it without printing a path.
    """
    path = figure_path(name)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def show_source(obj: object):
    """Display the source of ``obj`` as highlighted Python (an IPython ``Markdown`` object)."""
    import inspect

    from IPython.display import Markdown

    return Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```")
