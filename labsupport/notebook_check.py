"""Scan executed notebooks for what a student should never see: errors, warnings, text fallbacks.

No paper here: this is the course's quality check. A notebook that ran cleanly still fails a student
when a cell's output carries a warning they were not meant to see -- tqdm's "IProgress not found"
(ipywidgets missing: text bars instead of widgets), a DeprecationWarning, matplotlib's "non-interactive
backend" -- or a figure printed as ``<Figure size 640x480 with 1 Axes>`` instead of drawn. Every line a
cell writes to stderr is a finding unless :data:`ALLOWED` names it as shown on purpose (the server's log
line for a rejected client in chapter 01's robustness section). Used by the browser test
(``tests/browser/``) on the copies it runs in JupyterLab, and on ``make all``'s executed notebooks:
``python -m labsupport.notebook_check results/notebooks``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ALLOWED", "Finding", "main", "notebook_paths", "scan_notebook", "scan_paths"]

# Lines a lab writes to stderr on purpose, each with the reason. Anything else on stderr is a finding.
ALLOWED: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"^(?:WARNING labsupport\.(?:fl|flower): )?round \d+: rejected client \d+: \S"),
        "the FL server logs each client update it rejects (chapter 01: a server that survives "
        "bad clients)",
    ),
    (
        re.compile(r"^(?:WARNING labsupport\.(?:fl|flower): )?round \d+: no valid update; "),
        "the FL server logs a round in which every update was rejected",
    ),
)

_FIGURE_REPR = re.compile(r"<Figure size \d+(?:\.\d+)?x\d+(?:\.\d+)? with \d+ Axes>")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Finding:
    """One thing in a notebook's outputs a student should not see."""

    notebook: str
    cell: int  # index among all cells, 0-based, as JupyterLab and nbformat count them
    kind: str  # "error", "stderr" or "figure-as-text"
    text: str

    def __str__(self) -> str:
        return f"{self.notebook}: cell {self.cell}: {self.kind}: {self.text}"


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def _allowed(line: str, allowed: Sequence[tuple[re.Pattern[str], str]]) -> bool:
    return any(pattern.search(line) for pattern, _ in allowed)


def scan_notebook(
    notebook: dict | str | Path,
    *,
    name: str | None = None,
    allowed: Sequence[tuple[re.Pattern[str], str]] = ALLOWED,
) -> list[Finding]:
    """The findings in one executed notebook (a path or the notebook's JSON as a dict).

    Reports every error output, every stderr line not matched by ``allowed`` (tqdm's carriage-return
    redraws count as separate lines), and every figure shown only as its text repr.
    """
    if isinstance(notebook, str | Path):
        path = Path(notebook)
        name = name or path.name
        notebook = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise TypeError(
            f"expected a notebook (a path or its JSON as a dict with a 'cells' list), "
            f"got {type(notebook).__name__}"
        )
    name = name or "<notebook>"
    findings = []
    for index, cell in enumerate(notebook["cells"]):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "error":
                text = f"{output.get('ename', '?')}: {output.get('evalue', '')}"
                findings.append(Finding(name, index, "error", text))
            elif kind == "stream" and output.get("name") == "stderr":
                text = _ANSI.sub("", _text(output.get("text", "")))
                for line in re.split(r"[\r\n]+", text):
                    if line.strip() and not _allowed(line.strip(), allowed):
                        findings.append(Finding(name, index, "stderr", line.strip()))
            elif kind in ("display_data", "execute_result"):
                data = output.get("data", {})
                plain = _text(data.get("text/plain", ""))
                if _FIGURE_REPR.search(plain) and not any(k.startswith("image/") for k in data):
                    findings.append(Finding(name, index, "figure-as-text", plain.strip()))
    return findings


def notebook_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The ``.ipynb`` files among ``paths``, with folders replaced by the notebooks in them."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.glob("*.ipynb") if p.is_file())
        elif path.suffix == ".ipynb" and path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path} is neither a folder nor an .ipynb file")
    return found


def scan_paths(paths: Iterable[str | Path]) -> list[Finding]:
    """The findings in every notebook under ``paths`` (files or folders of ``.ipynb``)."""
    return [f for path in notebook_paths(paths) for f in scan_notebook(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.notebook_check", description=__doc__
    )
    parser.add_argument("paths", nargs="+", help="executed notebooks, or folders of them")
    args = parser.parse_args(argv)
    paths = notebook_paths(args.paths)
    if not paths:
        parser.error(f"no .ipynb files in {' '.join(args.paths)}")
    findings = [f for path in paths for f in scan_notebook(path)]
    for finding in findings:
        print(finding)
    print(f"{len(paths)} notebooks scanned, {len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
