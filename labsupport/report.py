"""``python -m labsupport.report``: the results table, regenerated from ``results/bench/*.json``.

The README's table sits between ``<!-- results:begin -->`` and ``<!-- results:end -->`` and is never
edited by hand: ``make results`` runs the benchmarks, then this command rewrites the table from their
JSON files (and writes the same table to ``results/README.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from labsupport.bench import results_dir

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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
        f"Measured by `make results` (`python -m labsupport.bench all`) on {machine.get('cpus')} CPU(s), "
        f"{machine.get('processor')}, Python {machine.get('python')}, "
        f"{machine.get('torch_threads')} torch thread(s)."
    )
    return "\n".join(rows)


def update_readme(readme: Path, text: str) -> None:
    """Replace the block between the markers in ``readme`` with ``text``."""
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block to replace")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labsupport.report", description=__doc__)
    parser.add_argument(
        "--bench-dir", default=None, help="default: $LAB_RESULTS_DIR/bench or results/bench"
    )
    parser.add_argument("--readme", default=None, help="also rewrite the table in this README")
    args = parser.parse_args(argv)
    bench_dir = Path(args.bench_dir) if args.bench_dir else results_dir() / "bench"
    text = table(bench_dir)
    out = bench_dir.parent / "README.md"
    out.write_text("# Results\n\n" + text + "\n")
    if args.readme:
        update_readme(Path(args.readme), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
