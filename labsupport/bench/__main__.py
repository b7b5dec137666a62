"""``python -m labsupport.bench <name> [--smoke]`` / ``--list`` / ``all``."""

from __future__ import annotations

import argparse
import sys

from . import load_all, run, summary_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labsupport.bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run, or 'all'")
    parser.add_argument(
        "--smoke", action="store_true", help="a short run that keeps every code path"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--out", default=None, help="output folder (default: results/bench)")
    args = parser.parse_args(argv)
    entries = load_all()
    if args.list or not args.names:
        for e in entries.values():
            print(f"{e.name:22s} {e.chapter:4s} {e.description}")
        return 0 if args.list else 2
    names = list(entries) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in entries]
    if unknown:
        print(
            f"unknown benchmark(s) {unknown}; run --list to see {sorted(entries)}", file=sys.stderr
        )
        return 2
    lines = []
    for name in names:
        payload = run(name, smoke=args.smoke, out_dir=args.out)
        lines.append(summary_line(payload))
        print(lines[-1], flush=True)
    if len(lines) > 1:  # the summary comes last
        print("\n".join(["", "summary:", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
