from __future__ import annotations

import matplotlib.pyplot as plt  # the Agg backend: MPLBACKEND is set in conftest.py

from labsupport.notebook import figure_path, save_figure, show_source, smoke_mode


def test_smoke_mode_reads_the_environment(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("LAB_SMOKE", value)
        assert smoke_mode() is expected
    monkeypatch.delenv("LAB_SMOKE")
    assert smoke_mode() is False


def test_save_figure_writes_under_the_results_dir_only_when_asked(tmp_path, monkeypatch):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    monkeypatch.delenv("LAB_RESULTS_DIR", raising=False)
    assert save_figure(fig, "x") is None and figure_path("x") is None
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path))
    save_figure(fig, "chapter_plot")
    assert (tmp_path / "figures" / "chapter_plot.png").read_bytes()[:4] == b"\x89PNG"
    plt.close(fig)


def test_show_source_renders_python():
    md = show_source(smoke_mode)
    assert md.data.startswith("```python\ndef smoke_mode")
