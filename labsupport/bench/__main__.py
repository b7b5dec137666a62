"""``python -m labsupport.bench <name> [--smoke]`` / ``--list`` / ``all``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import load_all, results_dir, run, summary_line


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
    if len(names) == 1:
        print(summary_line(run(names[0], smoke=args.smoke, out_dir=args.out)), flush=True)
        return 0
    # Several benchmarks: each in a fresh process. Run in one, a benchmark also measured what the
    # ones before it left behind (Ray's workers, allocator state, thread pools): sim_overhead's ratio
    # after edge_table in the same process moved by more than its target's margin, either way.
    folder = Path(args.out) if args.out is not None else results_dir() / "bench"
    lines, failed = [], []
    for name in names:
        cmd = [sys.executable, "-m", "labsupport.bench", name, "--out", str(folder)]
        started = time.time()
        if subprocess.run(cmd + (["--smoke"] if args.smoke else [])).returncode != 0:
            failed.append(name)
            lines.append(f"{name}: FAILED (its output is above)")
            continue
        result = folder / f"{name}.json"
        if not result.is_file() or result.stat().st_mtime < started - 1:
            failed.append(name)
            lines.append(f"{name}: wrote no result to {result}")
            continue
        lines.append(summary_line(json.loads(result.read_text())))
    print("\n".join(["", "summary:", *lines]))
    if failed:
        print(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
