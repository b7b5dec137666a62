"""The labs as students open them: each chapter notebook run through JupyterLab's UI in Chromium.

Checked for each notebook (a copy, in smoke mode): Run All finishes, every code cell ran, every plot
is an image the browser decoded, every progress bar is a widget, nothing unexpected on stderr
(labsupport.notebook_check), the kernel is the project's Python, and its process ends on shutdown.
Small synthetic notebooks show that each check fails when it should: a cell that raises, a plot that
does not render, ipywidgets missing.

Which chapters: ``LAB_BROWSER_NOTEBOOKS=ci`` (default: notebook 00 and the newest chapter),
``all``, ``none``, or a comma-separated list of name prefixes (``00,03``). Screenshots of each
chapter's end state go to ``results/screenshots/``, the executed copies to ``results/browser/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import nbformat
import pytest
from jupyterlab_testlib import ROOT, problems, run_in_lab

pytestmark = pytest.mark.slow


def _chapters() -> list[Path]:
    # Chapter notebooks only: the generated exercise copies (06_exercises_*) raise by design in
    # their check cells until a student fills them in; their solutions run under nbval.
    notebooks = sorted(
        nb for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if "_exercises_" not in nb.name
    )
    mode = os.environ.get("LAB_BROWSER_NOTEBOOKS", "ci").strip().lower()
    if mode == "all":
        return notebooks
    if mode == "none":
        return []
    if mode == "ci":
        return sorted({notebooks[0], notebooks[-1]}) if notebooks else []
    prefixes = [p.strip() for p in mode.split(",") if p.strip()]
    chosen = [nb for nb in notebooks if any(nb.name.startswith(p) for p in prefixes)]
    if not chosen:
        raise ValueError(
            f"LAB_BROWSER_NOTEBOOKS={mode!r} matches no notebook; expected all, ci, none or "
            f"name prefixes of {[nb.name for nb in notebooks]}"
        )
    return chosen


def _synthetic(tmp_path: Path, name: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def _outputs_text(run, cell: int) -> str:
    return "".join(
        "".join(out.get("text", "")) for out in run.notebook["cells"][cell].get("outputs", [])
    )


def test_synthetic_lab_with_a_plot_and_a_progress_bar_passes_every_check(browser, lab, tmp_path):
    source = _synthetic(
        tmp_path,
        "synthetic_good.ipynb",
        "import os, sys\nfrom tqdm.auto import tqdm\nimport matplotlib.pyplot as plt\n"
        "print(sys.executable)\nprint('LAB_SMOKE=' + os.environ.get('LAB_SMOKE', ''))",
        "for _ in tqdm(range(3), desc='steps'):\n    pass",
        "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot([1, 3, 2]);",
        # a log line the labs show on purpose (the allow-list), printed by logging's last resort
        "import logging\n"
        "logging.getLogger('labsupport.fl').warning('round 1: rejected client 3: NaN update')",
    )
    run = run_in_lab(browser, lab, source, timeout_s=120)
    assert problems(run) == []
    assert _outputs_text(run, 0).split() == [sys.executable, "LAB_SMOKE=1"]
    assert run.dom["images"] == [True]
    assert run.dom["progress_bars"] == 1 and run.dom["finished_bars"] == 1
    assert run.dom["stderr"] and "rejected client 3" in run.dom["stderr"][0]


def test_check_fails_when_a_cell_raises(browser, lab, tmp_path):
    source = _synthetic(
        tmp_path,
        "synthetic_raises.ipynb",
        "x = 1",
        "raise ValueError('a student would see this')",
        "y = 2",
    )
    run = run_in_lab(browser, lab, source, timeout_s=120)
    found = problems(run)
    assert run.ran_all is False
    assert any(p.startswith("Run All did not finish cleanly") for p in found), found
    assert "code cells that never ran: [2]" in found
    assert "synthetic_raises.ipynb: cell 1: error: ValueError: a student would see this" in found


def test_check_fails_when_a_plot_does_not_render(browser, lab, tmp_path):
    source = _synthetic(
        tmp_path,
        "synthetic_no_plot.ipynb",
        # a non-inline backend: the figure reaches the page only as its text repr
        "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\nax.plot([1, 2])\nfig",
        # PNG bytes the browser cannot decode: an <img> that stays empty
        "from IPython.display import display\ndisplay({'image/png': 'AAAA'}, raw=True)",
    )
    run = run_in_lab(browser, lab, source, timeout_s=120)
    found = problems(run)
    assert run.ran_all is True
    assert any(": cell 0: figure-as-text: <Figure size" in p for p in found), found
    assert "broken image (not decoded by the browser): images [0] of 1" in found


def test_check_fails_when_ipywidgets_is_missing(browser, lab, tmp_path):
    source = _synthetic(
        tmp_path,
        "synthetic_no_widgets.ipynb",
        "import sys\nsys.modules['ipywidgets'] = None  # `import ipywidgets` now fails\n"
        "from tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass",
    )
    run = run_in_lab(browser, lab, source, timeout_s=120)
    found = problems(run)
    assert run.ran_all is True
    assert run.dom["progress_bars"] == 0
    assert any("IProgress not found" in p for p in found), found
    assert any("100%|" in p for p in found), found  # the text bar tqdm fell back to


def test_check_fails_when_a_process_outlives_its_kernel(browser, lab, tmp_path):
    source = _synthetic(
        tmp_path,
        "synthetic_orphan.ipynb",
        "import subprocess\n"
        "orphan = subprocess.Popen(['sleep', '120'], start_new_session=True)\nprint(orphan.pid)",
    )
    run = run_in_lab(browser, lab, source, timeout_s=120, settle_s=3)
    orphan = int(_outputs_text(run, 0))
    try:
        assert orphan in run.kernel_left
        assert any(p.startswith("processes still running after") for p in problems(run))
    finally:
        for pid in run.kernel_left:  # this test's own orphan, by id
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("notebook", _chapters(), ids=lambda p: p.stem)
def test_chapter_runs_cleanly_in_jupyterlab(browser, lab, results_dir, notebook):
    run = run_in_lab(
        browser, lab, notebook, timeout_s=900, screenshot_dir=results_dir / "screenshots"
    )
    executed = results_dir / "browser"
    executed.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lab.root_dir / notebook.name, executed / notebook.name)
    found = problems(run)
    assert not found, f"{notebook.name} (screenshot {run.screenshot}):\n" + "\n".join(found[:40])
    assert any(run.dom["images"]), f"{notebook.name} drew no plot"
