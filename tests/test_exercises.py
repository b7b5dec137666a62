"""Chapter 06's exercises: the generator, the solution notebooks' conventions, the student stubs.

The notebooks themselves run under nbval (solutions pass every check; student copies' check cells
are tagged ``raises-exception``); the checks' own tests are in ``tests/checks/``.
"""

from __future__ import annotations
import __future__

import inspect
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from labsupport.exercises import (
    RAISES,
    ExerciseFormatError,
    student_notebook,
    student_source,
    write_student_notebooks,
)

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("06_exercises_*.ipynb"))
STUDENTS = [ROOT / "notebooks" / p.name for p in SOLUTIONS]


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _grader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


# --------------------------------------------------------------------------- the generator
def test_there_are_solution_notebooks_each_with_a_student_copy():
    assert SOLUTIONS, "solutions/ holds no 06_exercises_*.ipynb"
    missing = [p.name for p in STUDENTS if not p.exists()]
    assert not missing, f"no student copy in notebooks/ for {missing}"


def test_committed_student_notebooks_are_exactly_what_the_generator_writes():
    stale = write_student_notebooks(ROOT / "solutions", ROOT / "notebooks", check=True)
    assert not stale, (
        f"{stale} differ from the generator's output: run `python -m labsupport.exercises`"
    )


def test_generator_is_byte_for_byte_reproducible(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    write_student_notebooks(ROOT / "solutions", first)
    write_student_notebooks(ROOT / "solutions", second)
    for p in SOLUTIONS:
        assert (first / p.name).read_bytes() == (second / p.name).read_bytes()


@pytest.mark.slow
def test_command_line_check_fails_on_a_stale_copy(tmp_path):
    out = tmp_path / "nb"
    out.mkdir()
    cmd = [sys.executable, "-m", "labsupport.exercises", "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT).returncode == 0
    assert subprocess.run([*cmd, "--check"], capture_output=True, cwd=ROOT).returncode == 0
    victim = out / SOLUTIONS[0].name
    victim.write_text(victim.read_text().replace("YOUR CODE HERE", "my code"))
    proc = subprocess.run([*cmd, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and SOLUTIONS[0].name in proc.stderr


def test_solution_region_becomes_an_indented_stub_and_hidden_tests_vanish():
    src = (
        "def f(x):\n"
        '    """doc"""\n'
        "    ### BEGIN SOLUTION\n"
        "    return x + 1\n"
        "    ### END SOLUTION\n"
        "check(f)\n"
        "### BEGIN HIDDEN TESTS\n"
        "check(f, seed=3)\n"
        "### END HIDDEN TESTS"
    )
    assert student_source(src) == (
        'def f(x):\n    """doc"""\n    # YOUR CODE HERE\n    raise NotImplementedError()\ncheck(f)'
    )


def test_markdown_solution_becomes_an_answer_prompt():
    src = "Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION"
    assert student_source(src, cell_type="markdown") == "Why?\nYOUR ANSWER HERE"


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("def f():\n    ### BEGIN SOLUTION\n    return 1", "never closed"),
        ("def f():\n    return 1\n    ### END SOLUTION", "without"),
        ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "inside a function"),
        (
            "def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION",
            "inside another",
        ),
        ("### BEGIN HIDDEN TESTS\ncheck()", "never closed"),
    ],
)
def test_malformed_markers_are_refused(src, message):
    with pytest.raises(ExerciseFormatError, match=message):
        student_source(src)


def test_a_marker_in_a_cell_without_solution_metadata_is_refused():
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    ### END SOLUTION")]
    )
    with pytest.raises(ExerciseFormatError, match="solution: true"):
        student_notebook(nb)


def test_generator_leaves_the_solution_notebook_unchanged():
    nb = _read(SOLUTIONS[0])
    before = nbformat.writes(nb)
    student_notebook(nb)
    assert nbformat.writes(nb) == before


# --------------------------------------------------------------------------- solution notebooks
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_notebook_follows_the_notebook_conventions(path):
    nb = json.loads(path.read_text())
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "parameters" in code.get("metadata", {}).get("tags", [])
    assert "smoke_mode()" in "".join(code["source"])
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: strip the outputs of cells {dirty}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_notebook_carries_valid_nbgrader_metadata(path):
    nb = _read(path)
    ids = []
    solutions = graded = 0
    for i, cell in enumerate(nb.cells):
        meta = _grader(cell)
        if not meta:
            assert "### BEGIN" not in cell.source, f"cell {i} has markers but no nbgrader metadata"
            continue
        assert meta["schema_version"] == 3
        for key in ("grade", "solution", "locked", "grade_id"):
            assert key in meta, f"cell {i}: nbgrader metadata lacks {key!r}"
        ids.append(meta["grade_id"])
        if meta["solution"]:
            solutions += 1
            assert "### BEGIN SOLUTION" in cell.source and not meta["locked"]
        if meta["grade"]:
            graded += 1
            assert meta["locked"] and not meta["solution"]
            assert isinstance(meta.get("points"), (int, float)) and meta["points"] > 0
            assert "check_" in cell.source, f"cell {i} is graded but calls no check"
    assert len(ids) == len(set(ids)), f"duplicate grade_id in {path.name}: {ids}"
    assert solutions and graded


# --------------------------------------------------------------------------- student copies
@pytest.mark.parametrize("path", STUDENTS, ids=lambda p: p.name)
def test_student_copy_hides_solutions_and_tags_its_check_cells(path):
    nb = _read(path)
    text = path.read_text()
    assert "### BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None
        if _grader(cell).get("grade"):
            assert RAISES in cell.metadata.get("tags", []), "a check cell must expect to raise"


def _stub_calls(cell_source: str) -> list[tuple[str, object]]:
    """Define a student solution cell in isolation; return (name, object) of what it defines."""
    ns: dict = {"torch": torch, "np": np, "nn": nn, "F": F, "math": math}
    before = set(ns)
    code = compile(cell_source, "<stub>", "exec", flags=__future__.annotations.compiler_flag)
    exec(code, ns)
    return [(k, v) for k, v in ns.items() if k not in before and not k.startswith("__")]


def _nones(fn) -> dict:
    sig = inspect.signature(fn)
    args, kwargs = [], {}
    for p in sig.parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = None
        else:
            args.append(None)
    return {"args": args, "kwargs": kwargs}


@pytest.mark.parametrize("path", STUDENTS, ids=lambda p: p.name)
def test_every_student_stub_raises_not_implemented(path):
    nb = _read(path)
    stubs = 0
    for cell in nb.cells:
        if not _grader(cell).get("solution") or cell.cell_type != "code":
            continue
        assert "raise NotImplementedError()" in cell.source
        for _, obj in _stub_calls(cell.source):
            if inspect.isfunction(obj):
                call = _nones(obj)
                with pytest.raises(NotImplementedError):
                    obj(*call["args"], **call["kwargs"])
                stubs += 1
            elif inspect.isclass(obj):
                for _meth_name, meth in vars(obj).items():
                    if inspect.isfunction(meth) and "NotImplementedError" in meth.__code__.co_names:
                        instance = object.__new__(obj)
                        call = _nones(meth)
                        with pytest.raises(NotImplementedError):
                            meth(instance, *call["args"], **call["kwargs"])
                        stubs += 1
    assert stubs, f"{path.name}: no stub found"


# --------------------------------------------------------------------------- nbgrader
@pytest.mark.slow
def test_nbgrader_generate_assignment_accepts_the_solution_notebooks(tmp_path):
    pytest.importorskip("nbgrader")
    source = tmp_path / "source" / "ch06"
    source.mkdir(parents=True)
    for p in SOLUTIONS:
        shutil.copy(p, source / p.name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbgrader",
            "generate_assignment",
            "ch06",
            "--no-db",
            f"--CourseDirectory.root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for p in SOLUTIONS:
        released = (tmp_path / "release" / "ch06" / p.name).read_text()
        assert "### BEGIN SOLUTION" not in released and "raise NotImplementedError()" in released
        assert "HIDDEN TESTS" not in released
