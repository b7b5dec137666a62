"""The plots every notebook draws, written once: learning curves of any run, and partitions.

:func:`plot_curves` draws any :class:`~labsupport.fl.history.History` (the FedAvg server, gossip,
Flower) against rounds, cumulative bytes uploaded, or cumulative local steps, with horizontal
reference lines (a target, a centralized or local-only baseline) in the same axes.
:func:`plot_partition` (from :mod:`labsupport.partitions`) draws who holds which classes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from labsupport.fl.history import History
from labsupport.partitions import plot_partition

__all__ = ["plot_curves", "plot_partition"]

_X = {
    "round": "round",
    "bytes_up": "MB uploaded by clients",
    "steps": "local SGD steps (all clients)",
}


def plot_curves(
    histories: Mapping[str, History],
    *,
    x: str = "round",
    y: str = "accuracy",
    references: Mapping[str, float] | None = None,
    ax=None,
    percent: bool = True,
    logx: bool = False,
    title: str | None = None,
    marker: str = ".",
):
    """One line per run: ``y`` (a record field or ``extra`` entry) at every round it was measured.

    ``x`` is ``"round"``, ``"bytes_up"`` (cumulative, in MB) or ``"steps"`` (cumulative
    ``metrics["steps"]`` -- needs runs that record it in ``extra["steps"]``). ``references`` maps
    labels to values drawn as dotted horizontal lines. Returns the axes.
    """
    import matplotlib.pyplot as plt

    if x not in _X:
        raise ValueError(f"x must be one of {sorted(_X)}, got {x!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    scale = 100.0 if percent else 1.0
    for label, h in histories.items():
        if not isinstance(h, History):
            raise TypeError(f"run {label!r} is a {type(h).__name__}; expected a History")
        rounds, values = h.evaluated(y)
        if not rounds:
            continue
        if x == "round":
            xs = np.asarray(rounds)
        else:
            column = "bytes_up" if x == "bytes_up" else "steps"
            total = np.asarray(h.cumulative(column), dtype=float)
            positions = {r.round: i for i, r in enumerate(h.rounds)}
            xs = total[[positions[r] for r in rounds]] / (1e6 if x == "bytes_up" else 1.0)
        ax.plot(xs, scale * np.asarray(values, dtype=float), marker=marker, label=label)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(scale * value, ls=":", color=f"C{(len(histories) + i) % 10}", label=label)
    unit = " (%)" if percent else ""
    ax.set(xlabel=_X[x], ylabel=f"{y.replace('_', ' ')}{unit}")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    if histories or references:
        ax.legend(fontsize=8)
    return ax
