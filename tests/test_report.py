"""labsupport.report: tables from make all's files; make all changes nothing tracked."""

import shutil
import subprocess
from pathlib import Path

import pytest

from labsupport.report import TIMES_BEGIN, TIMES_END, times_table, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_times_table_formats_minutes_and_seconds(tmp_path):
    tsv = tmp_path / "notebook_times.tsv"
    tsv.write_text("00_tour.ipynb\t48\n01_fundamentals.ipynb\t1021\n")
    text = times_table(tsv)
    assert "| `00_tour.ipynb` | 48 s |" in text
    assert "| `01_fundamentals.ipynb` | 17 min 01 s |" in text
    assert times_table(tmp_path / "missing.tsv") is None


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{TIMES_BEGIN}\nold\n{TIMES_END}\ntail\n")
    update_readme(readme, "new", TIMES_BEGIN, TIMES_END)
    assert readme.read_text() == f"head\n{TIMES_BEGIN}\nnew\n{TIMES_END}\ntail\n"
    with pytest.raises(ValueError, match="no"):
        update_readme(readme, "x")  # the results markers are not there


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_all_writes_nothing_tracked():
    """`make all` (dry run) writes under results/ only: no command rewrites the README."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "all", "VENV=.venv-dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "labsupport.report" in out and "papermill" in out
    assert "--readme" not in out and "README.md" not in out.replace("results/README.md", "")
    readme_target = subprocess.run(
        ["make", "--no-print-directory", "-n", "readme-table", "VENV=.venv-dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--readme README.md" in readme_target
