"""Fixtures of the browser tests: a system Chromium through Playwright, one JupyterLab server.

pytest runs with ``--import-mode=importlib``, so this folder is put on ``sys.path`` for the tests'
shared helpers, ``jupyterlab_testlib``. Skipped, with the reason, without ``playwright`` or Chromium.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from jupyterlab_testlib import CHROMIUM, CHROMIUM_ARGS, RESULTS

from labsupport.labserver import LabServer


@pytest.fixture(scope="module")
def browser():
    """A headless system Chromium driven by Playwright (skipped where either is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set LAB_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, browser):
    """One JupyterLab server for the session; stopping it must leave no process behind."""
    work = tmp_path_factory.mktemp("lab")
    root = work / "notebooks"
    root.mkdir()
    server = LabServer(root, smoke=True, workdir=work / "jupyter")
    server.start()
    yield server
    leftover = server.stop()
    assert leftover == [], f"JupyterLab processes still running after stop: {leftover}"


@pytest.fixture(scope="session")
def results_dir() -> Path:
    return RESULTS
