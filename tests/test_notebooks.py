"""Notebook conventions. (The notebooks themselves run under nbval: `pytest notebooks --nbval-lax`.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _committed(path: Path) -> dict | None:
    """The notebook as committed in HEAD, or None outside a git checkout / for a new file."""
    if shutil.which("git") is None:
        return None
    rel = path.relative_to(ROOT).as_posix()
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"HEAD:{rel}"], capture_output=True, text=True
    )
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = _committed(path)
    if nb is None:
        pytest.skip(f"{path.name} is not committed (or this is not a git checkout)")
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name} was committed with outputs in cells {dirty}; strip them "
        "(`nbstripout notebooks/*.ipynb`, or install the pre-commit hooks) and commit again"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_a_parameters_cell_reading_smoke_mode(path):
    nb = json.loads(path.read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "parameters" in first.get("metadata", {}).get("tags", []), (
        f"{path.name}: tag the first code cell 'parameters' (papermill overrides it)"
    )
    assert "smoke_mode()" in "".join(first["source"]), (
        f"{path.name}: the parameters cell must read LAB_SMOKE through labsupport.notebook.smoke_mode()"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_a_title_and_objectives(path):
    nb = json.loads(path.read_text())
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")
