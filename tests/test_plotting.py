"""labsupport.plotting draws any History against rounds or cumulative bytes, with references."""

import matplotlib

matplotlib.use("Agg")

import pytest

from labsupport.fl import History, RoundRecord
from labsupport.plotting import plot_curves


def _history():
    return History(
        [
            RoundRecord(round=r, accuracy=0.1 * r if r % 2 == 0 else None, bytes_up=2_000_000)
            for r in range(1, 7)
        ]
    )


def test_plot_curves_puts_each_evaluated_round_at_its_cumulative_megabytes():
    ax = plot_curves({"run": _history()}, x="bytes_up", references={"target": 0.5})
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [4.0, 8.0, 12.0]  # rounds 2, 4, 6 at 2 MB per round
    assert list(line.get_ydata()) == pytest.approx([20.0, 40.0, 60.0])
    assert ax.get_lines()[1].get_ydata()[0] == pytest.approx(50.0)


def test_plot_curves_reads_extra_entries_and_refuses_unknown_axes():
    h = History([RoundRecord(round=1, extra={"consensus_distance": 2.0})])
    ax = plot_curves({"g": h}, y="consensus_distance", percent=False)
    assert list(ax.get_lines()[0].get_ydata()) == [2.0]
    with pytest.raises(ValueError, match="x must be one of"):
        plot_curves({"g": h}, x="seconds")
    with pytest.raises(TypeError, match="expected a History"):
        plot_curves({"g": [1, 2]})
