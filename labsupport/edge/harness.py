"""One benchmark harness for every model variant of chapter 04 (PyTorch, ONNX Runtime, TensorRT).

For each :class:`Variant` (a name, a ``predict(np.ndarray) -> logits`` callable, its size):

* latency at batch 1 and batch 64 -- warm-up calls, then repeated timed calls *interleaved* across
  variants in rounds (load on a shared machine hits every variant alike); p50/p90/p99 in ms and
  throughput (samples/s at batch 64, from the p50);
* size: bytes on disk for files (ONNX, engines, safetensors checkpoints), else the bytes of the
  tensors the model holds (``size_kind`` says which);
* peak memory of the inference process: the variant's file is loaded and run at batch 64 in a fresh
  subprocess (:mod:`labsupport.edge.memprobe`; an ONNX file is probed without importing PyTorch),
  which reports its peak resident set (Linux ``VmHWM``; on Linux ``ru_maxrss`` would carry the
  parent's peak across fork+exec) and the RSS it had after importing its runtime, before loading
  the model (``model_rss_mib`` = the difference). Variants that exist
  only in memory (PT2E graphs, torchao tensors) have no file to load and get NaN;
* test accuracy, and the thread count used.

:func:`edge_profile` pins one intra-op thread (a small edge CPU); :func:`add_ratios` adds ratios
against a baseline row, :func:`pareto_mask` marks the accuracy-vs-latency Pareto front and
:func:`plot_pareto` draws it; :func:`save_outputs` writes the table (CSV, JSON) and the plot under
``labsupport.bench.results_dir() / "edge"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "Variant",
    "accuracy",
    "add_ratios",
    "benchmark_variants",
    "edge_profile",
    "measure_latency",
    "ort_variant",
    "pareto_mask",
    "peak_memory",
    "plot_pareto",
    "save_outputs",
    "torch_variant",
]


@dataclass
class Variant:
    """One model to measure. ``artifact`` (+ ``artifact_kind`` ``onnx``/``checkpoint``) is a file
    the memory probe can load in a fresh process; ``None`` for in-memory-only variants."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    runtime: str
    size_bytes: int
    size_kind: str = "file"
    params: int | None = None
    provider: str = "CPU"
    artifact: Path | None = None
    artifact_kind: str | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _safetensors_bytes(model: nn.Module) -> int:
    from safetensors.torch import save

    return len(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def torch_variant(
    name: str,
    model: nn.Module,
    *,
    checkpoint: str | os.PathLike | None = None,
    note: str = "",
) -> Variant:
    """A PyTorch model as a :class:`Variant` (eval mode, ``inference_mode``).

    Size: the safetensors file it would be saved as for plain models, else its tensor bytes
    (:func:`labsupport.edge.quantize.tensor_bytes`). ``checkpoint`` (a :func:`save_checkpoint` stem)
    lets the memory probe load it.
    """
    from labsupport.edge.quantize import tensor_bytes

    model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    if isinstance(model, torch.fx.GraphModule):  # PT2E: only what the graph reads counts
        size, kind = tensor_bytes(model), "tensors"
    else:
        try:
            size, kind = _safetensors_bytes(model), "file"
        except Exception:  # tensor subclasses / packed params: no plain state dict
            size, kind = tensor_bytes(model), "tensors"
    params = sum(p.numel() for p in model.parameters())
    return Variant(
        name,
        predict,
        "pytorch",
        size,
        kind,
        params or None,
        "CPU",
        Path(checkpoint) if checkpoint is not None else None,
        "checkpoint" if checkpoint is not None else None,
        note,
    )


def ort_variant(
    name: str,
    path: str | os.PathLike,
    *,
    providers: Sequence[str] | None = None,
    threads: int = 1,
    note: str = "",
) -> Variant:
    """An ONNX file run by ONNX Runtime as a :class:`Variant`; ``provider`` is the one that ran."""
    from labsupport.edge.export import DEFAULT_PROVIDERS, OrtModel, onnx_size_bytes

    runner = OrtModel(path, providers or DEFAULT_PROVIDERS, threads=threads)
    return Variant(
        name,
        runner,
        "onnxruntime",
        onnx_size_bytes(path),
        "file",
        None,
        runner.provider,
        Path(path),
        "onnx",
        note,
    )


def measure_latency(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    *,
    warmup: int = 10,
    repeats: int = 100,
) -> np.ndarray:
    """Seconds per call of ``predict(x)``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        predict(x)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        predict(x)
        times[i] = time.perf_counter() - start
    return times


def accuracy(
    predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 256
) -> float:
    """Fraction of ``argmax(predict(x)) == y`` over ``x`` in batches."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"x and y must be non-empty and equal in length, got {len(x)} and {len(y)}"
        )
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((np.asarray(predict(x[i : i + batch])).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


@contextlib.contextmanager
def edge_profile(threads: int = 1) -> Iterator[int]:
    """Pin torch to ``threads`` intra-op threads for the block (ORT sessions take ``threads`` too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def peak_memory(
    path: str | os.PathLike,
    kind: str,
    *,
    batch: int = 64,
    threads: int = 1,
    length: int = 40,
    timeout: float = 120.0,
) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that loads ``path`` and runs it at ``batch``.

    Returns ``peak_rss_mib`` (the process's peak RSS), ``base_rss_mib`` (RSS after importing
    the runtime) and ``model_rss_mib`` (their difference: what loading and running the model adds).
    """
    from labsupport.edge import memprobe

    cmd = [
        sys.executable,
        memprobe.__file__,  # as a script: an ONNX probe never imports torch
        kind,
        str(path),
        "--batch",
        str(batch),
        "--threads",
        str(threads),
        "--length",
        str(length),
    ]
    if kind == "checkpoint":  # the script's folder is first on sys.path, not the repository
        root = str(Path(memprobe.__file__).resolve().parents[2])
        env_path = os.environ.get("PYTHONPATH")
        extra = {"PYTHONPATH": root + (os.pathsep + env_path if env_path else "")}
    else:
        extra = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **extra}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe for {path} failed: {out.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def benchmark_variants(
    variants: Sequence[Variant],
    x_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    *,
    threads: int = 1,
    batch_sizes: tuple[int, int] = (1, 64),
    warmup: int = 10,
    repeats: int = 100,
    rounds: int = 3,
    memory: bool = True,
):
    """Measure every variant side by side; returns a pandas DataFrame, one row per variant.

    Columns: ``variant, runtime, provider, threads, params, size_bytes, size_kind, accuracy``,
    ``p50/p90/p99_b1_ms`` and ``_b64_ms``, ``throughput_b64`` (samples/s), ``peak_rss_mib``,
    ``model_rss_mib``, ``note``.
    """
    import pandas as pd

    if not variants:
        raise ValueError("no variants to benchmark")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    if rounds < 1 or repeats < rounds:
        raise ValueError(f"need rounds >= 1 and repeats >= rounds, got {rounds} and {repeats}")
    x = np.ascontiguousarray(np.asarray(x_test, dtype=np.float32))
    y = np.asarray(y_test)
    rng = np.random.default_rng(0)
    inputs = {b: x[rng.choice(len(x), size=b, replace=len(x) < b)] for b in batch_sizes}
    times: dict[tuple[str, int], list[np.ndarray]] = {
        (n, b): [] for n in names for b in batch_sizes
    }
    with edge_profile(threads):
        for r in range(rounds):
            for v in variants:
                for b in batch_sizes:
                    w = warmup if r == 0 else 2
                    times[(v.name, b)].append(
                        measure_latency(v.predict, inputs[b], warmup=w, repeats=repeats // rounds)
                    )
        rows = []
        for v in variants:
            row = {
                "variant": v.name,
                "runtime": v.runtime,
                "provider": v.provider,
                "threads": threads,
                "params": v.params,
                "size_bytes": v.size_bytes,
                "size_kind": v.size_kind,
                "accuracy": accuracy(v.predict, x, y),
            }
            for b in batch_sizes:
                t = np.concatenate(times[(v.name, b)]) * 1e3
                tag = f"b{b}"
                for q in (50, 90, 99):
                    row[f"p{q}_{tag}_ms"] = float(np.percentile(t, q))
            big = max(batch_sizes)
            row[f"throughput_b{big}"] = big / (row[f"p50_b{big}_ms"] / 1e3)
            row["peak_rss_mib"], row["model_rss_mib"] = float("nan"), float("nan")
            if memory and v.artifact is not None:
                mem = peak_memory(v.artifact, v.artifact_kind, batch=big, threads=threads)
                row["peak_rss_mib"], row["model_rss_mib"] = (
                    mem["peak_rss_mib"],
                    mem["model_rss_mib"],
                )
            row["note"] = v.note
            rows.append(row)
    return pd.DataFrame(rows)


def add_ratios(df, baseline: str):
    """Add ``size_ratio``, ``speedup_b1``, ``speedup_b64`` and ``acc_drop`` (points) vs row ``baseline``."""
    if baseline not in set(df["variant"]):
        raise ValueError(f"baseline {baseline!r} is not a variant; have {list(df['variant'])}")
    base = df.set_index("variant").loc[baseline]
    out = df.copy()
    out["size_ratio"] = base["size_bytes"] / out["size_bytes"]
    out["speedup_b1"] = base["p50_b1_ms"] / out["p50_b1_ms"]
    out["speedup_b64"] = base["p50_b64_ms"] / out["p50_b64_ms"]
    out["acc_drop"] = (base["accuracy"] - out["accuracy"]) * 100.0
    return out


def pareto_mask(cost: Sequence[float], value: Sequence[float]) -> np.ndarray:
    """True for points no other point beats: lower-or-equal cost and higher-or-equal value, one strictly."""
    c, v = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    if c.shape != v.shape:
        raise ValueError(f"cost and value must have the same length, got {c.shape} and {v.shape}")
    keep = np.ones(len(c), dtype=bool)
    for i in range(len(c)):
        dominated = (c <= c[i]) & (v >= v[i]) & ((c < c[i]) | (v > v[i]))
        keep[i] = not dominated.any()
    return keep


def plot_pareto(df, cost: str = "p50_b1_ms", value: str = "accuracy", ax=None):
    """Accuracy vs latency scatter (log x), the Pareto front joined by a line; returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    else:
        fig = ax.figure
    mask = pareto_mask(df[cost], df[value])
    ax.scatter(df[cost], df[value] * 100, c=np.where(mask, "tab:red", "tab:gray"), zorder=3)
    for _, row in df.iterrows():
        ax.annotate(
            row["variant"],
            (row[cost], row[value] * 100),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
    front = df[mask].sort_values(cost)
    ax.plot(front[cost], front[value] * 100, "--", color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"{cost} (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


def save_outputs(df, fig=None, stem: str = "edge_table") -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.json`` (and ``<stem>.png``) under ``results_dir()/edge``."""
    from labsupport.bench import results_dir

    folder = results_dir() / "edge"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / f"{stem}.csv", "json": folder / f"{stem}.json"}
    df.to_csv(paths["csv"], index=False)
    paths["json"].write_text(df.to_json(orient="records", indent=2))
    if fig is not None:
        paths["png"] = folder / f"{stem}.png"
        fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
    return paths
