"""The instructor answer key: every table and summary line of an executed notebook, as JSON and Markdown.

No paper here: this is course tooling. ``make all`` executes each lab in full mode with papermill into
``results/notebooks/``; this module reads those executed copies and writes, per notebook,
``<out>/<notebook>.json`` and ``<out>/<notebook>.md`` holding

* every **table**: a pandas DataFrame shown as the *last expression* of a code cell (an
  ``execute_result`` output whose ``text/html`` is pandas' ``<table class="dataframe">``), parsed back
  into its index, columns and cell values -- named by the first comment line of the cell, else by the
  nearest heading above it, with the cell's index;
* every **summary line**: what a code cell tagged ``summary`` (or ``answer-key``) printed to stdout.

An instructor compares a student's run with these numbers (chapters 00 and 01 print their closing
summaries from a ``summary``-tagged cell). The HTML is parsed with the standard library's
:class:`html.parser.HTMLParser` (no lxml/bs4): pandas writes index levels as ``<th>`` cells, with
``rowspan`` for repeated outer levels and an extra header row for index names, and both are expanded
here. Cell values keep the text pandas displayed; numbers are also given as numbers where the text
parses as one. Nothing is executed and nothing is unpickled: a notebook is JSON.

Run: ``python -m labsupport.answer_key results/notebooks results/answer_key``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

__all__ = [
    "SUMMARY_TAGS",
    "Table",
    "extract",
    "main",
    "parse_dataframe_html",
    "to_markdown",
    "write_answer_key",
]

#: Cell tags whose printed output becomes the notebook's summary lines in the answer key.
SUMMARY_TAGS = ("summary", "answer-key")


@dataclass
class Table:
    """A DataFrame as displayed: ``index`` rows (one tuple of labels per row), ``columns``, ``values``
    (the displayed text), ``numbers`` (each value as int/float where it parses, else None)."""

    title: str
    cell: int
    index_names: list[str]
    columns: list[str]
    index: list[list[str]]
    values: list[list[str]]
    numbers: list[list[float | int | None]]


class _TableParser(HTMLParser):
    """Collect the rows of every ``<table>``'s ``thead`` and ``tbody``: (text, rowspan, colspan) cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict[str, list[list[tuple[str, bool, int, int]]]]] = []
        self._section: str | None = None
        self._row: list[tuple[str, bool, int, int]] | None = None
        self._cell: list[Any] | None = None  # [text parts, is_header, rowspan, colspan]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"thead": [], "tbody": []})
            self._section = "tbody"
        elif tag in ("thead", "tbody") and self.tables:
            self._section = tag
        elif tag == "tr" and self.tables:
            self._row = []
        elif tag in ("th", "td") and self._row is not None:
            self._cell = [[], tag == "th", _span(a.get("rowspan")), _span(a.get("colspan"))]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None and self._row is not None:
            text = " ".join("".join(self._cell[0]).split())
            self._row.append((text, self._cell[1], self._cell[2], self._cell[3]))
            self._cell = None
        elif tag == "tr" and self._row is not None and self.tables and self._section:
            self.tables[-1][self._section].append(self._row)
            self._row = None
        elif tag in ("thead", "tbody"):
            self._section = "tbody"

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[0].append(data)


def _span(value: str | None) -> int:
    try:
        return max(1, int(value)) if value is not None else 1
    except ValueError:
        return 1


def _expand(rows: list[list[tuple[str, bool, int, int]]]) -> list[list[tuple[str, bool]]]:
    """Lay ``rows`` on a grid, copying a cell with ``rowspan``/``colspan`` into every slot it covers."""
    grid: list[list[tuple[str, bool] | None]] = []
    for r, row in enumerate(rows):
        while len(grid) <= r:
            grid.append([])
        c = 0
        for text, header, rowspan, colspan in row:
            while c < len(grid[r]) and grid[r][c] is not None:
                c += 1
            for dr in range(rowspan):
                while len(grid) <= r + dr:
                    grid.append([])
                line = grid[r + dr]
                while len(line) < c + colspan:
                    line.append(None)
                for dc in range(colspan):
                    line[c + dc] = (text, header)
            c += colspan
    return [[cell if cell is not None else ("", True) for cell in line] for line in grid]


def _number(text: str) -> float | int | None:
    t = text.replace(",", "").strip()
    if t.endswith("%"):
        t = t[:-1]
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    try:
        value = float(t)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def parse_dataframe_html(html: str, *, title: str = "", cell: int = -1) -> list[Table]:
    """The tables in pandas' HTML for a DataFrame (``DataFrame._repr_html_`` / ``to_html``).

    Index levels are the leading ``<th>`` cells of each body row; a header row whose cells after the
    index are all empty holds the index names; several column header rows are joined with ``" / "``.
    Raises ValueError if ``html`` holds no ``<table>``.
    """
    if not isinstance(html, str):
        raise TypeError(f"html must be a string, got {type(html).__name__}")
    parser = _TableParser()
    parser.feed(html)
    parser.close()
    if not parser.tables:
        raise ValueError("no <table> in the HTML; expected pandas' DataFrame HTML")
    out = []
    for raw in parser.tables:
        body = _expand(raw["tbody"])
        head = _expand(raw["thead"])
        n_index = min((sum(1 for _ in _leading_headers(row)) for row in body), default=0)
        width = max((len(row) for row in body + head), default=0)
        index_names = [""] * n_index
        column_rows = []
        for row in head:
            row = row + [("", True)] * (width - len(row))
            rest = [t for t, _ in row[n_index:]]
            if n_index and not any(rest) and any(t for t, _ in row[:n_index]):
                index_names = [t for t, _ in row[:n_index]]
            else:
                column_rows.append(rest)
        columns = [
            " / ".join(dict.fromkeys(r[i] for r in column_rows if r[i]))
            for i in range(width - n_index)
        ]
        index = [[t for t, _ in row[:n_index]] for row in body]
        values = [[t for t, _ in row[n_index:]] for row in body]
        out.append(
            Table(
                title=title,
                cell=cell,
                index_names=index_names,
                columns=columns,
                index=index,
                values=values,
                numbers=[[_number(v) for v in row] for row in values],
            )
        )
    return out


def _leading_headers(row: list[tuple[str, bool]]):
    for text, header in row:
        if not header:
            return
        yield text


def _cell_title(cells: list[dict], i: int) -> str:
    source = _text(cells[i].get("source", ""))
    first = source.lstrip().split("\n", 1)[0].strip()
    if first.startswith("#"):
        return first.lstrip("#").strip()
    for j in range(i - 1, -1, -1):
        if cells[j].get("cell_type") == "markdown":
            for line in _text(cells[j].get("source", "")).split("\n"):
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def extract(notebook: dict | str | Path, *, name: str | None = None) -> dict[str, Any]:
    """The answer key of one executed notebook: ``{"notebook", "parameters", "tables", "summary"}``.

    ``notebook`` is a path to an ``.ipynb`` file or its JSON as a dict. ``parameters`` are the ones
    papermill injected (empty if none); ``tables`` are :class:`Table` dicts in cell order; ``summary``
    the stdout lines of cells tagged with one of :data:`SUMMARY_TAGS`.
    """
    if isinstance(notebook, str | Path):
        path = Path(notebook)
        name = name or path.stem
        notebook = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise TypeError(
            "expected a notebook (a path or its JSON as a dict with a 'cells' list), "
            f"got {type(notebook).__name__}"
        )
    cells = notebook["cells"]
    tables: list[Table] = []
    summary: list[str] = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        tags = set(cell.get("metadata", {}).get("tags", []))
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "execute_result":
                html = _text(output.get("data", {}).get("text/html", ""))
                if 'class="dataframe' in html:
                    tables.extend(parse_dataframe_html(html, title=_cell_title(cells, i), cell=i))
            elif kind == "stream" and output.get("name") == "stdout" and tags & set(SUMMARY_TAGS):
                summary.extend(line for line in _text(output.get("text", "")).splitlines() if line)
    parameters = notebook.get("metadata", {}).get("papermill", {}).get("parameters", {})
    return {
        "notebook": name or "notebook",
        "parameters": parameters,
        "tables": [asdict(t) for t in tables],
        "summary": summary,
    }


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(key: dict[str, Any]) -> str:
    """The answer key as Markdown: the summary lines, then every table as a pipe table."""
    lines = [f"# Answer key: {key['notebook']}", ""]
    if key.get("parameters"):
        lines += [f"Parameters: `{json.dumps(key['parameters'], sort_keys=True)}`", ""]
    if key["summary"]:
        lines += ["## Summary", "", "```text", *key["summary"], "```", ""]
    for t in key["tables"]:
        heading = t["title"] or "table"
        lines += [f"## {heading} (cell {t['cell']})", ""]
        header = [*(n or " " for n in t["index_names"]), *t["columns"]]
        lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
        lines.append("|" + "---|" * len(header))
        for idx, row in zip(t["index"], t["values"], strict=True):
            lines.append("| " + " | ".join(_md_escape(v) for v in [*idx, *row]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_answer_key(notebook: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.json`` and ``.md`` for one executed notebook; return both paths."""
    path = Path(notebook)
    key = extract(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{path.stem}.json", out / f"{path.stem}.md"
    json_path.write_text(json.dumps(key, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(key), encoding="utf-8")
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labsupport.answer_key SRC OUT [--only 00_ 01_]``: SRC a notebook or a folder of them."""
    ap = argparse.ArgumentParser(
        prog="python -m labsupport.answer_key", description=__doc__.split("\n")[0]
    )
    ap.add_argument("src", help="an executed .ipynb or a folder of them (papermill output)")
    ap.add_argument("out", help="folder for <notebook>.json and <notebook>.md")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="notebook name prefixes to include (default: every notebook in SRC)",
    )
    args = ap.parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        paths = sorted(src.glob("*.ipynb"))
    elif src.is_file():
        paths = [src]
    else:
        ap.error(f"{src} is neither a notebook nor a folder")
    if args.only:
        paths = [p for p in paths if p.name.startswith(tuple(args.only))]
    if not paths:
        ap.error(f"no notebooks in {src}")
    for p in paths:
        write_answer_key(p, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
