"""``python -m labsupport.report``: the results tables, regenerated from what ``make all`` measured.

Two tables, never edited by hand: the benchmarks' (from ``results/bench/*.json``) and the notebooks'
full-mode wall times (from ``results/notebook_times.tsv``, one ``<notebook>\t<seconds>`` line per
notebook, written by ``make all``). Both go to ``results/README.md``; with ``--readme README.md``
(``make readme-table``, a maintainer's step) they also replace the blocks between
``<!-- results:begin -->``/``<!-- results:end -->`` and ``<!-- times:begin -->``/``<!-- times:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from labsupport.bench import load_all, results_dir

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TIMES_BEGIN, TIMES_END = "<!-- times:begin -->", "<!-- times:end -->"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(bench_dir: Path) -> str:
    """A markdown table of every benchmark's targets (and its other figures) in ``bench_dir``."""
    files = sorted(bench_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(
            f"no benchmark results in {bench_dir}; run `python -m labsupport.bench all` first"
        )
    rows = ["| benchmark | figure | measured | target | met |", "|---|---|---|---|---|"]
    for path in files:
        payload = json.loads(path.read_text())
        name = payload["benchmark"] + (" (smoke)" if payload.get("smoke") else "")
        judged = set()
        for target in payload["targets"].values():
            judged.add(target["figure"])
            note = f" ({target['note']})" if target.get("note") else ""
            rows.append(
                f"| {name} | {target['figure']} | {_fmt(target['value'])} | "
                f"{target['description']}{note} | {'yes' if target['met'] else '**no**'} |"
            )
        for figure, value in payload["figures"].items():
            if figure not in judged:
                rows.append(f"| {name} | {figure} | {_fmt(value)} | | |")
    machine = json.loads(files[0].read_text()).get("machine", {})
    rows.append("")
    rows.append(
        f"Measured with `python -m labsupport.bench NAME ...` (`make bench` runs all "
        f"{len(load_all())}; this table holds the {len(files)} above) on {machine.get('cpus')} CPU(s), "
        f"{machine.get('processor')}, Python {machine.get('python')}, "
        f"{machine.get('torch_threads')} torch thread(s)."
    )
    return "\n".join(rows)


def times_table(times_file: Path) -> str | None:
    """A markdown table of notebook wall times from ``make all``'s TSV, or None if it is missing."""
    if not times_file.exists():
        return None
    rows = ["| notebook | full-mode wall time |", "|---|---|"]
    for line in times_file.read_text().splitlines():
        if not line.strip():
            continue
        name, seconds = line.split("\t")
        minutes, secs = divmod(round(float(seconds)), 60)
        rows.append(
            f"| `{name}` | {minutes} min {secs:02d} s |" if minutes else f"| `{name}` | {secs} s |"
        )
    return "\n".join(rows)


def update_readme(readme: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between the markers ``begin`` and ``end`` in ``readme`` with ``text``."""
    content = readme.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{readme} has no {begin} ... {end} block to replace")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labsupport.report", description=__doc__)
    parser.add_argument(
        "--bench-dir", default=None, help="default: $LAB_RESULTS_DIR/bench or results/bench"
    )
    parser.add_argument("--readme", default=None, help="also rewrite the table in this README")
    args = parser.parse_args(argv)
    bench_dir = Path(args.bench_dir) if args.bench_dir else results_dir() / "bench"
    text = table(bench_dir)
    times = times_table(bench_dir.parent / "notebook_times.tsv")
    out = bench_dir.parent / "README.md"
    body = "# Results\n\n" + text + "\n"
    if times:
        body += "\n## Notebooks (full mode)\n\n" + times + "\n"
    out.write_text(body)
    if args.readme:
        update_readme(Path(args.readme), text)
        if times:
            update_readme(Path(args.readme), times, TIMES_BEGIN, TIMES_END)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
