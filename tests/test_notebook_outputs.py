"""The scan of executed notebooks' outputs (labsupport.notebook_check): what it flags and allows.

The notebooks it scans for real come from the browser test (tests/browser/, copies run in
JupyterLab) and from `make all` (`python -m labsupport.notebook_check results/notebooks`).
"""

from __future__ import annotations

import json

import nbformat
import pytest
from tqdm.notebook import WARN_NOIPYW

from labsupport.notebook_check import ALLOWED, main, notebook_paths, scan_notebook, scan_paths


def _notebook(*outputs_per_cell: list[dict]) -> dict:
    """A notebook (as JSON) with a markdown cell, then one code cell per list of outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title")]
    for i, outputs in enumerate(outputs_per_cell):
        cell = nbformat.v4.new_code_cell(f"x = {i}", execution_count=i + 1)
        cell.outputs = [nbformat.from_dict(o) for o in outputs]
        nb.cells.append(cell)
    nbformat.validate(nb)
    return json.loads(nbformat.writes(nb))


def _stderr(text: str) -> dict:
    return {"output_type": "stream", "name": "stderr", "text": text}


def _stdout(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


# What tqdm.auto writes to a cell when ipywidgets is missing: its own warning text, then a text bar.
TQDM_FALLBACK = (
    f"/venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: {WARN_NOIPYW}\n"
    "  from .autonotebook import tqdm as notebook_tqdm\n"
)
TEXT_BAR = "\r  0%|          | 0/3 [00:00<?, ?it/s]\r100%|##########| 3/3 [00:00<00:00, 9.1it/s]\n"
FIGURE_PNG = {
    "output_type": "display_data",
    "metadata": {},
    "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure size 640x480 with 1 Axes>"},
}
FIGURE_TEXT = {
    "output_type": "display_data",
    "metadata": {},
    "data": {"text/plain": "<Figure size 1300x400 with 2 Axes>"},
}
ERROR = {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": ["..."]}


def test_clean_notebook_with_prints_and_a_drawn_figure_has_no_findings():
    nb = _notebook(
        [_stdout("accuracy 91.2%\nwarning: this word in stdout is prose\n")], [FIGURE_PNG]
    )
    assert scan_notebook(nb) == []


def test_tqdm_fallback_without_ipywidgets_is_flagged_with_the_iprogress_warning():
    findings = scan_notebook(_notebook([], [_stderr(TQDM_FALLBACK)]), name="nb.ipynb")
    assert findings, "the IProgress warning went unnoticed"
    assert findings[0].notebook == "nb.ipynb"
    assert findings[0].cell == 2  # markdown is cell 0: indices count every cell, as JupyterLab does
    assert findings[0].kind == "stderr"
    assert "IProgress not found" in findings[0].text


def test_text_progress_bar_is_flagged_once_per_redraw():
    findings = scan_notebook(_notebook([_stderr(TEXT_BAR)]))
    assert [f.text.split("|")[0] for f in findings] == ["0%", "100%"]


def test_rejected_client_log_line_is_allowed_but_a_neighbouring_warning_is_not():
    text = (
        "WARNING labsupport.fl: round 1: rejected client 9: update for 'fc1.weight' has NaN\n"
        "round 2: rejected client 10: num_samples must be positive, got 0\n"
        "/x/y.py:3: DeprecationWarning: old API\n"
    )
    findings = scan_notebook(_notebook([_stderr(text)]))
    assert [f.text for f in findings] == ["/x/y.py:3: DeprecationWarning: old API"]


def test_allow_list_does_not_match_a_rejection_from_another_logger():
    line = "WARNING someone.else: round 1: rejected client 3: x"
    assert not any(pattern.search(line) for pattern, _ in ALLOWED)
    assert len(scan_notebook(_notebook([_stderr(line + "\n")]))) == 1


def test_error_output_is_flagged_with_its_exception():
    findings = scan_notebook(_notebook([], [ERROR]))
    assert [(f.cell, f.kind, f.text) for f in findings] == [(2, "error", "ValueError: boom")]


def test_figure_shown_only_as_text_is_flagged():
    findings = scan_notebook(_notebook([FIGURE_TEXT], [FIGURE_PNG]))
    assert [(f.cell, f.kind) for f in findings] == [(1, "figure-as-text")]


def test_ansi_colour_codes_do_not_hide_a_warning():
    findings = scan_notebook(_notebook([_stderr("\x1b[33mUserWarning: careful\x1b[0m\n")]))
    assert [f.text for f in findings] == ["UserWarning: careful"]


def test_scan_paths_reads_files_and_folders(tmp_path):
    (tmp_path / "a.ipynb").write_text(json.dumps(_notebook([_stderr(TQDM_FALLBACK)])))
    (tmp_path / "b.ipynb").write_text(json.dumps(_notebook([FIGURE_PNG])))
    (tmp_path / "notes.txt").write_text("not a notebook")
    assert notebook_paths([tmp_path]) == [tmp_path / "a.ipynb", tmp_path / "b.ipynb"]
    findings = scan_paths([tmp_path])
    assert {f.notebook for f in findings} == {"a.ipynb"}


def test_command_line_exit_code_says_whether_anything_was_found(tmp_path, capsys):
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    clean.mkdir()
    dirty.mkdir()
    (clean / "a.ipynb").write_text(json.dumps(_notebook([FIGURE_PNG])))
    (dirty / "b.ipynb").write_text(json.dumps(_notebook([ERROR])))
    assert main([str(clean)]) == 0
    assert main([str(dirty)]) == 1
    out = capsys.readouterr().out
    assert "b.ipynb: cell 1: error: ValueError: boom" in out
    with pytest.raises(SystemExit):
        main([str(tmp_path)])  # tmp_path itself holds no notebook


@pytest.mark.parametrize("bad", [42, ["cells"], {"cells": "no list"}])
def test_scan_rejects_something_that_is_not_a_notebook(bad):
    with pytest.raises(TypeError, match="expected a notebook"):
        scan_notebook(bad)


def test_notebook_paths_rejects_a_file_that_is_not_a_notebook(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="neither a folder nor an .ipynb"):
        notebook_paths([tmp_path / "x.txt"])
    with pytest.raises(ValueError, match="neither a folder nor an .ipynb"):
        notebook_paths([tmp_path / "missing.ipynb"])
