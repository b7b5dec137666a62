"""Benchmarks: one entry point for every chapter, ``python -m labsupport.bench <name> [--smoke]``.

Speed and memory targets are benchmarks, not timed unit tests: the machines these labs run on are
shared and noisy, so a benchmark measures what it compares *side by side in one run* and reports a
ratio. Each benchmark returns a :class:`Result`; :func:`run` writes it to
``results/bench/<name>.json`` as ``{"figures": {...}, "targets": {...}, "met": {...}}`` and prints a
one-line summary last. ``python -m labsupport.report`` turns those files into the README's table.

A benchmark is a function ``fn(smoke: bool) -> Result`` registered with :func:`benchmark` in any
module of this package: :func:`load_all` imports every one of them, so a chapter adds a benchmark by
adding a module. Benchmarks only measure; what they run (clients, rounds to a target, learning-rate
search) lives in :mod:`labsupport.experiments` and the chapter packages, where the notebooks use it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BENCHMARKS", "Result", "Target", "benchmark", "results_dir", "run"]


@dataclass(frozen=True)
class Target:
    """A bound on one figure: met when ``min <= figure <= max`` (either bound may be open)."""

    figure: str
    min: float | None = None
    max: float | None = None
    note: str = ""

    def met(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g} <= {self.figure} <= {self.max:g}"
        if self.min is not None:
            return f"{self.figure} >= {self.min:g}"
        return f"{self.figure} <= {self.max:g}"


@dataclass
class Result:
    """Figures measured by a benchmark, the targets that judge them, and anything else worth keeping."""

    figures: dict[str, float]
    targets: dict[str, Target] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def met(self) -> dict[str, bool]:
        for name, t in self.targets.items():
            if t.figure not in self.figures:
                raise KeyError(
                    f"target {name!r} judges figure {t.figure!r}, which was not measured"
                )
        return {name: t.met(self.figures[t.figure]) for name, t in self.targets.items()}

    def to_json(self) -> dict:
        met = self.met()
        return {
            "figures": self.figures,
            "targets": {
                name: {
                    "figure": t.figure,
                    "min": t.min,
                    "max": t.max,
                    "value": self.figures[t.figure],
                    "met": met[name],
                    "description": t.describe(),
                    "note": t.note,
                }
                for name, t in self.targets.items()
            },
            "met": met,
            "details": self.details,
        }


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: Callable[[bool], Result]
    description: str
    chapter: str


BENCHMARKS: dict[str, _Entry] = {}


def benchmark(name: str, description: str, chapter: str = "") -> Callable:
    """Register ``fn(smoke: bool) -> Result`` as benchmark ``name``."""

    def decorate(fn: Callable[[bool], Result]) -> Callable[[bool], Result]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name] = _Entry(name, fn, description, chapter)
        return fn

    return decorate


def load_all() -> dict[str, _Entry]:
    """Import every module of this package (each registers its benchmarks) and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return BENCHMARKS


def results_dir() -> Path:
    """``$LAB_RESULTS_DIR`` or ``results/`` in the current directory."""
    return Path(os.environ.get("LAB_RESULTS_DIR", "results"))


def run(name: str, smoke: bool = False, out_dir: str | os.PathLike | None = None) -> dict:
    """Run benchmark ``name``, write its JSON and return it."""
    entries = load_all()
    if name not in entries:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(entries)}")
    from labsupport.device import set_threads

    before = torch.get_num_threads()
    threads = set_threads()
    start = time.perf_counter()
    try:
        result = entries[name].fn(smoke)
    finally:
        torch.set_num_threads(before)
    payload = result.to_json()
    payload["benchmark"] = name
    payload["description"] = entries[name].description
    payload["smoke"] = smoke
    payload["seconds"] = round(time.perf_counter() - start, 2)
    payload["machine"] = {
        "python": platform.python_version(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
    }
    folder = Path(out_dir) if out_dir is not None else results_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return payload


def summary_line(payload: dict) -> str:
    figures = ", ".join(f"{k}={_fmt(v)}" for k, v in payload["figures"].items())
    met = payload["met"]
    verdict = f"{sum(met.values())}/{len(met)} targets met" if met else "no targets"
    smoke = " [smoke]" if payload.get("smoke") else ""
    return f"{payload['benchmark']}{smoke}: {figures} -- {verdict} ({payload['seconds']:.1f} s)"


def _fmt(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
