"""Student notebooks from solution notebooks: one source for chapter 06's exercises.

The solution notebooks ``solutions/06_exercises_*.ipynb`` are written for nbgrader (Jupyter's
grading tool; Hamrick, "Creating and Grading IPython/Jupyter Notebook Assignments with NbGrader",
SIGCSE 2016): solution code sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION``, hidden
tests between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``, and every graded cell carries
nbgrader's cell metadata (``solution``, ``grade``, ``grade_id``, ``points``, ``schema_version: 3``),
so an instructor can import them into nbgrader unchanged (``solutions/README.md``).

This module is the small generator the course uses without nbgrader (``python -m
labsupport.exercises``): for each solution notebook it writes ``notebooks/<same name>`` where

* every solution region becomes ``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the
  region's indentation (a markdown solution cell becomes "YOUR ANSWER HERE");
* hidden-test regions are removed;
* outputs and execution counts are stripped;
* every code cell from the first solution cell on, other than the solution cells themselves, is
  tagged ``raises-exception``: in the student copy the checks fail until the student has written the
  code, and nbval (``--nbval-lax``) accepts a tagged cell that raises.

Solution regions must sit inside a function or class body (indented), so that running a student
copy's solution cell defines stubs instead of raising. The output is deterministic -- the same
solution notebook always gives the same bytes -- and ``--check`` (a test, and CI) fails when a
committed student copy differs from what the generator writes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import nbformat

__all__ = [
    "BEGIN_HIDDEN",
    "BEGIN_SOLUTION",
    "END_HIDDEN",
    "END_SOLUTION",
    "ExerciseFormatError",
    "main",
    "student_notebook",
    "student_source",
    "write_student_notebooks",
]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = "YOUR ANSWER HERE"
RAISES = "raises-exception"
PATTERN = "06_exercises_*.ipynb"

ROOT = Path(__file__).resolve().parents[1]


class ExerciseFormatError(ValueError):
    """A solution notebook breaks the format (unbalanced markers, a top-level solution region)."""


def _regions(lines: list[str], begin: str, end: str, where: str) -> list[tuple[int, int]]:
    """``(start, stop)`` line pairs of each ``begin`` ... ``end`` region (markers included)."""
    out, start = [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text == begin:
            if start is not None:
                raise ExerciseFormatError(f"{where}: line {i + 1}: {begin!r} inside another region")
            start = i
        elif text == end:
            if start is None:
                raise ExerciseFormatError(f"{where}: line {i + 1}: {end!r} without {begin!r}")
            out.append((start, i))
            start = None
    if start is not None:
        raise ExerciseFormatError(f"{where}: line {start + 1}: {begin!r} is never closed")
    return out


def _drop_hidden(lines: list[str], where: str) -> list[str]:
    keep = [True] * len(lines)
    for a, b in _regions(lines, BEGIN_HIDDEN, END_HIDDEN, where):
        keep[a : b + 1] = [False] * (b - a + 1)
    return [line for line, k in zip(lines, keep, strict=True) if k]


def student_source(source: str, *, cell_type: str = "code", where: str = "cell") -> str:
    """A cell's source with solution regions stubbed and hidden tests removed."""
    lines = _drop_hidden(source.split("\n"), where)
    regions = _regions(lines, BEGIN_SOLUTION, END_SOLUTION, where)
    out: list[str] = []
    pos = 0
    for a, b in regions:
        out.extend(lines[pos:a])
        indent = lines[a][: len(lines[a]) - len(lines[a].lstrip())]
        if cell_type == "code":
            if not indent:
                raise ExerciseFormatError(
                    f"{where}: line {a + 1}: a solution region must be inside a function or class "
                    "body, so that the student copy defines a stub instead of raising"
                )
            out.extend(indent + s for s in STUB)
        else:
            out.append(MARKDOWN_STUB)
        pos = b + 1
    out.extend(lines[pos:])
    return "\n".join(out)


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def student_notebook(
    solution: nbformat.NotebookNode, *, name: str = "notebook"
) -> nbformat.NotebookNode:
    """The student copy of a solution notebook (a new object; ``solution`` is not changed)."""
    nb = copy.deepcopy(solution)
    seen_solution = False
    for i, cell in enumerate(nb.cells):
        where = f"{name}, cell {i}"
        meta = _nbgrader(cell)
        is_solution = bool(meta.get("solution"))
        src = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        has_marker = BEGIN_SOLUTION in src
        if has_marker and not is_solution:
            raise ExerciseFormatError(
                f"{where}: holds {BEGIN_SOLUTION!r} but its nbgrader metadata lacks solution: true"
            )
        cell.source = student_source(src, cell_type=cell.cell_type, where=where)
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        tags = [t for t in cell.metadata.get("tags", []) if t != RAISES]
        if is_solution:
            seen_solution = True
        elif seen_solution:
            tags.append(RAISES)
        if tags:
            cell.metadata["tags"] = tags
        else:
            cell.metadata.pop("tags", None)
    nb.metadata.pop("widgets", None)
    return nb


def _dumps(nb: nbformat.NotebookNode) -> str:
    """nbformat's own layout (sorted keys, one-space indent), newline-terminated: deterministic."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def write_student_notebooks(
    solutions: Path = ROOT / "solutions", out: Path = ROOT / "notebooks", *, check: bool = False
) -> list[str]:
    """Write (or with ``check=True`` compare) the student copy of every solution notebook.

    Returns the names written, or under ``check`` the names whose committed copy is missing or
    differs from what the generator produces.
    """
    paths = sorted(Path(solutions).glob(PATTERN))
    if not paths:
        raise FileNotFoundError(f"no solution notebooks {PATTERN} in {solutions}")
    changed = []
    for path in paths:
        solution = nbformat.read(path, as_version=4)
        text = _dumps(student_notebook(solution, name=path.name))
        target = Path(out) / path.name
        if check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                changed.append(path.name)
            continue
        target.write_text(text, encoding="utf-8")
        changed.append(path.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.exercises",
        description="Generate the student notebooks notebooks/06_exercises_*.ipynb from solutions/.",
    )
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions")
    parser.add_argument("--out", type=Path, default=ROOT / "notebooks")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a student copy is stale"
    )
    args = parser.parse_args(argv)
    names = write_student_notebooks(args.solutions, args.out, check=args.check)
    if args.check:
        if names:
            sys.stderr.write(
                f"stale student notebooks: {', '.join(names)}; run `python -m labsupport.exercises`\n"
            )
            return 1
        return 0
    sys.stdout.write(json.dumps({"written": names}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
