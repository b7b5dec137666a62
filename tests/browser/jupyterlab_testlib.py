"""Drive the labs as students open them: JupyterLab on loopback, a real Chromium, Run All, check.

A session-wide :class:`labsupport.labserver.LabServer` (random token, temporary config/data/runtime/
settings/workspace directories, ``LAB_SMOKE=1`` in its environment so kernels inherit it) serves a
temporary folder; :func:`run_in_lab` copies a notebook there, opens it in Chromium through Playwright,
runs all cells through the UI (``notebook:run-all-cells``), saves it, and returns what the page and the
saved copy show. :func:`problems` turns that into the list of things a student would trip over.

The fixtures (conftest.py) need the ``playwright`` package and a Chromium (``/usr/bin/chromium``,
or ``$LAB_CHROMIUM``); the tests are skipped, with the reason, where either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from labsupport.labserver import LabServer
from labsupport.notebook_check import Finding, scan_notebook

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("LAB_CHROMIUM", "/usr/bin/chromium"))
RESULTS = Path(os.environ.get("LAB_RESULTS_DIR", ROOT / "results"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    # no lookups of Google's hosts: every name but the loopback address fails at once
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
PANEL = "#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden)"

_KERNEL_READY = """() => {
    const dialog = document.querySelector('.jp-Dialog');
    if (dialog) return 'dialog: ' + dialog.innerText.slice(0, 300);
    const app = window.jupyterapp;
    const widget = app && app.shell.currentWidget;
    const session = widget && widget.sessionContext && widget.sessionContext.session;
    const kernel = session && session.kernel;
    return kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle'
        ? 'ready' : false;
}"""
_RUN_ALL = """() => {
    window.__labRun = undefined;
    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        (ok) => { window.__labRun = ok; },
        (err) => { window.__labRun = 'error: ' + err; });
}"""
_KERNEL_IDLE = """() => {
    const s = window.jupyterapp.shell.currentWidget.sessionContext.session;
    return s && s.kernel && s.kernel.status === 'idle';
}"""
_SCROLL_TO_END = f"""() => {{
    window.jupyterapp.shell.collapseLeft();
    const cells = document.querySelectorAll("{PANEL} .jp-Cell");
    if (cells.length) cells[cells.length - 1].scrollIntoView({{block: 'end'}});
}}"""
_DOM_FACTS = f"""() => {{
    const panel = document.querySelector("{PANEL}");
    const imgs = [...panel.querySelectorAll(
        ".jp-OutputArea-output[data-mime-type='image/png'] img")];
    const text = (sel) => [...panel.querySelectorAll(sel)].map((e) => e.innerText);
    return {{
        images: imgs.map((img) => img.complete && img.naturalWidth > 0),
        widgets: [...panel.querySelectorAll('.jp-OutputArea-output')].filter(
            (out) => out.querySelector('.jupyter-widgets')).length,
        progress_bars: panel.querySelectorAll('.widget-hprogress').length,
        finished_bars: panel.querySelectorAll('.widget-hprogress .progress-bar-success').length,
        widget_errors: text('.jp-OutputArea-output').filter(
            (t) => /Error displaying widget|Loading widget/.test(t)),
        stderr: text("[data-mime-type='application/vnd.jupyter.stderr']"),
    }};
}}"""


@dataclass
class LabRun:
    """What one notebook's Run All in JupyterLab left in the page and in the saved copy."""

    name: str
    ran_all: object  # True, False (a cell raised) or an 'error: ...' string
    seconds: float
    notebook: dict
    dom: dict
    kernel_cmd: list[str] = field(default_factory=list)
    kernel_left: list[int] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def findings(self) -> list[Finding]:
        return scan_notebook(self.notebook, name=self.name)

    def count_outputs(self, mime: str) -> int:
        return sum(
            mime in out.get("data", {})
            for cell in self.notebook["cells"]
            for out in cell.get("outputs", [])
        )


def problems(run: LabRun) -> list[str]:
    """Everything about ``run`` a student would trip over; an empty list means a clean run."""
    found = []
    if run.ran_all is not True:
        found.append(f"Run All did not finish cleanly: {run.ran_all!r} (a cell raised?)")
    never_ran = [
        i
        for i, cell in enumerate(run.notebook["cells"])
        if cell["cell_type"] == "code"
        and "".join(cell["source"]).strip()
        and cell.get("execution_count") is None
    ]
    if never_ran:
        found.append(f"code cells that never ran: {never_ran}")
    found += [str(f) for f in run.findings]
    saved_images = run.count_outputs("image/png")
    shown = run.dom["images"]
    if len(shown) != saved_images:
        found.append(f"{saved_images} image/png outputs saved but {len(shown)} images in the page")
    broken = [i for i, ok in enumerate(shown) if not ok]
    if broken:
        found.append(f"broken image (not decoded by the browser): images {broken} of {len(shown)}")
    saved_widgets = run.count_outputs("application/vnd.jupyter.widget-view+json")
    if run.dom["widgets"] < saved_widgets:
        found.append(
            f"{saved_widgets} widget outputs saved but {run.dom['widgets']} drawn as widgets"
        )
    found += [f"widget not displayed: {t.strip()[:200]}" for t in run.dom["widget_errors"]]
    python = os.path.abspath(sys.executable)  # a venv's python is a link: compare unresolved
    if run.kernel_cmd and os.path.abspath(run.kernel_cmd[0]) != python:
        found.append(f"kernel ran {run.kernel_cmd[0]}, not the project's Python {python}")
    if run.kernel_left:
        found.append(f"processes still running after the kernel's shutdown: {run.kernel_left}")
    return found


def _kernel_processes(lab: LabServer) -> list:
    import psutil

    server = psutil.Process(lab.proc.pid)
    return [p for p in server.children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]


def run_in_lab(
    browser,
    lab: LabServer,
    source: Path,
    *,
    timeout_s: float = 600.0,
    screenshot_dir: Path | None = None,
    settle_s: float = 20.0,
) -> LabRun:
    """Open a copy of ``source`` in JupyterLab, Run All, save, record, shut its kernel down.

    After the shutdown, waits up to ``settle_s`` for every process the kernel started to end.
    """
    import psutil

    name = source.name
    copy = lab.root_dir / name
    shutil.copyfile(source, copy)
    start = time.monotonic()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}&reset")
        handle = page.wait_for_function(_KERNEL_READY, timeout=120_000)
        state = handle.json_value()
        if state != "ready":
            raise AssertionError(f"{name}: JupyterLab did not reach a ready kernel: {state}")
        kernels = _kernel_processes(lab)
        lab.remember_children()
        page.evaluate(_RUN_ALL)
        page.wait_for_function(
            "() => window.__labRun !== undefined", timeout=timeout_s * 1000, polling=500
        )
        ran_all = page.evaluate("() => window.__labRun")
        page.wait_for_function(_KERNEL_IDLE, timeout=60_000, polling=200)
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        seconds = time.monotonic() - start
        page.evaluate(_SCROLL_TO_END)
        page.wait_for_timeout(300)
        dom = page.evaluate(_DOM_FACTS)
        shot = None
        if screenshot_dir is not None:
            screenshot_dir.mkdir(parents=True, exist_ok=True)
            shot = screenshot_dir / f"{copy.stem}.png"
            page.screenshot(path=str(shot))
        notebook = json.loads(copy.read_text(encoding="utf-8"))
        kernel_cmd = kernels[0].cmdline() if kernels else []
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    finally:
        page.close()
    psutil.wait_procs(kernels, timeout=20)
    deadline = time.monotonic() + settle_s  # the kernel's own children (Ray's processes...) too
    while (
        left := [p for p in lab.processes() if p != lab.proc.pid]
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    return LabRun(
        name=name,
        ran_all=ran_all,
        seconds=seconds,
        notebook=notebook,
        dom=dom,
        kernel_cmd=kernel_cmd,
        kernel_left=left,
        screenshot=shot,
    )
