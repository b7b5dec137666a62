"""labsupport.answer_key: tables and summary lines read back from a notebook that really ran.

The notebook is built here and executed once by nbclient (a real kernel, real pandas HTML): a
MultiIndex table whose outer level pandas writes with rowspan, a table with a named index, a
DataFrame that is displayed but not the last expression (not a table of the key), and a
summary-tagged cell. The key is checked against the DataFrames' own values.
"""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

from labsupport.answer_key import extract, main, parse_dataframe_html, to_markdown

CELLS = [
    ("markdown", "# A tiny lab", None),
    ("markdown", "## Rounds", None),
    (
        "code",
        "import pandas as pd\n"
        "rows = {('IID', 'E=1'): {'rounds': 12, 'acc (%)': 81.25},\n"
        "        ('IID', 'E=5'): {'rounds': 4, 'acc (%)': 82.5},\n"
        "        ('non-IID', 'E=1'): {'rounds': None, 'acc (%)': 40.0}}\n"
        "pd.DataFrame.from_dict(rows, orient='index')",
        None,
    ),
    (
        "code",
        "# Learning rates tried\n"
        "display(pd.DataFrame({'x': [1]}))  # shown, but not the last expression\n"
        "pd.DataFrame({'rounds': [7, 3]}, index=pd.Index([0.05, 0.1], name='lr'))",
        None,
    ),
    ("code", "print('accuracy 91.2%')\nprint('bytes | up 12')", ["summary"]),
    ("code", "print('not part of the key')", None),
]


@pytest.fixture(scope="module")
def executed():
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    for kind, source, tags in CELLS:
        cell = (nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell)(
            source
        )
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    return json.loads(nbformat.writes(nb))


def test_extracts_each_last_expression_dataframe_with_its_values(executed):
    key = extract(executed, name="tiny")
    assert [t["cell"] for t in key["tables"]] == [2, 3]
    rounds, lrs = key["tables"]
    assert rounds["title"] == "Rounds"  # the heading above the cell
    assert rounds["columns"] == ["rounds", "acc (%)"]
    # pandas writes the repeated outer level once, with rowspan: it is expanded into every row
    assert rounds["index"] == [["IID", "E=1"], ["IID", "E=5"], ["non-IID", "E=1"]]
    expected = pd.DataFrame({"rounds": [12, 4, None], "acc (%)": [81.25, 82.5, 40.0]})
    assert [row[0] for row in rounds["numbers"]] == [12.0, 4.0, None]  # NaN -> None
    assert [row[1] for row in rounds["numbers"]] == expected["acc (%)"].tolist()
    assert lrs["title"] == "Learning rates tried"  # the cell's own first comment line
    assert lrs["index_names"] == ["lr"] and lrs["columns"] == ["rounds"]
    assert lrs["index"] == [["0.05"], ["0.10"]] and lrs["numbers"] == [[7], [3]]


def test_summary_holds_only_the_tagged_cells_stdout(executed):
    key = extract(executed)
    assert key["summary"] == ["accuracy 91.2%", "bytes | up 12"]


def test_markdown_has_every_table_and_escapes_pipes(executed):
    text = to_markdown(extract(executed, name="tiny"))
    assert text.startswith("# Answer key: tiny")
    assert "bytes | up 12" in text  # inside the ```text block, as printed
    assert "| IID | E=5 | 4.0 | 82.50 |" in text
    assert "## Learning rates tried (cell 3)" in text


def test_command_line_writes_json_and_markdown_for_a_folder(executed, tmp_path):
    src = tmp_path / "notebooks"
    src.mkdir()
    (src / "00_tiny.ipynb").write_text(json.dumps(executed))
    (src / "99_other.ipynb").write_text(json.dumps(executed))
    assert main([str(src), str(tmp_path / "key"), "--only", "00_"]) == 0
    written = sorted(p.name for p in (tmp_path / "key").iterdir())
    assert written == ["00_tiny.json", "00_tiny.md"]
    data = json.loads((tmp_path / "key" / "00_tiny.json").read_text())
    assert data["notebook"] == "00_tiny" and len(data["tables"]) == 2


def test_rejects_input_that_is_not_a_notebook_or_a_table():
    with pytest.raises(TypeError, match="cells"):
        extract({"no": "cells"})
    with pytest.raises(ValueError, match="no <table>"):
        parse_dataframe_html("<div>just text</div>")
    with pytest.raises(TypeError):
        parse_dataframe_html(None)  # type: ignore[arg-type]


def test_colspan_headers_and_index_names_row_are_expanded():
    df = pd.DataFrame(
        [[1, 2, 3]],
        index=pd.Index(["a"], name="run"),
        columns=pd.MultiIndex.from_tuples([("acc", "val"), ("acc", "test"), ("MB", "up")]),
    )
    (t,) = parse_dataframe_html(df.to_html())
    assert t.columns == ["acc / val", "acc / test", "MB / up"]
    assert t.index_names == ["run"] and t.index == [["a"]] and t.numbers == [[1, 2, 3]]
