"""Fixtures of the Flower tests (flwr must be installed; every test here imports it).

pytest runs with ``--import-mode=importlib``, so this folder is put on ``sys.path`` for the tests'
shared helpers, ``flower_testlib``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("flwr")


@pytest.fixture
def task_identity(monkeypatch):
    """Messages a strategy creates take their run/node ids from TaskIdentity, set by a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
