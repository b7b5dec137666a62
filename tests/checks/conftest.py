"""The solutions of chapter 06's exercises, taken from the solution notebooks (the single source)."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

SOLUTIONS = Path(__file__).resolve().parents[2] / "solutions"


def solution_namespace(topic: str) -> dict:
    """Run the solution cells of ``solutions/06_exercises_<topic>.ipynb`` and return their names."""
    nb = nbformat.read(SOLUTIONS / f"06_exercises_{topic}.ipynb", as_version=4)
    ns = {"torch": torch, "np": np, "nn": nn, "F": F, "math": math}
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            exec(compile(cell.source, f"<{topic} solution>", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def solutions():
    return solution_namespace
