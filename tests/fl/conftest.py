"""pytest runs with ``--import-mode=importlib``: this folder goes on ``sys.path`` for the tests'
shared helpers (``vectorized_testlib``)."""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
