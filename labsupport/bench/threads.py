"""``threads``: one vs several torch intra-op threads for a small model's training steps.

Why :func:`labsupport.device.set_threads` defaults to 1. Several intra-op threads synchronise at every
operator; for a tiny matrix product that costs more than it saves, and when another process keeps a
core busy (a Ray worker, a second client, a neighbour on a shared machine) every operator waits for a
descheduled thread. Both settings train the same MLP on the same MNIST-1D batches, interleaved in one
run, once on an otherwise idle machine and once beside a busy process pinned to nothing in particular.
Figures: ``slowdown_idle`` and ``slowdown_busy`` = time with all cores ÷ time with one thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import torch

from labsupport.data import load_dataset
from labsupport.models import build_model
from labsupport.train import train

from . import Result, benchmark


def _spin(stop) -> None:  # a busy neighbour
    while not stop.is_set():
        sum(range(10_000))


def _time_training(threads: int, epochs: int, x, y) -> float:
    torch.set_num_threads(threads)
    model = build_model("mlp", (40,), 10, seed=0)
    start = time.perf_counter()
    train(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=32,
        lr=0.05,
        generator=torch.Generator().manual_seed(0),
    )
    return time.perf_counter() - start


def _compare(threads: int, epochs: int, repeats: int, x, y) -> tuple[float, float]:
    one, several = [], []
    for _ in range(repeats):  # interleaved, so load on a shared machine hits both alike
        one.append(_time_training(1, epochs, x, y))
        several.append(_time_training(threads, epochs, x, y))
    return min(one), min(several)


@benchmark(
    "threads", "MLP training time with all cores vs one torch thread, idle and busy", chapter="00"
)
def run(smoke: bool) -> Result:
    ds = load_dataset("mnist1d")
    many = max(2, os.cpu_count() or 2)
    epochs, repeats = (1, 2) if smoke else (3, 3)
    before = torch.get_num_threads()
    try:
        _time_training(1, 1, ds.x_train[:256], ds.y_train[:256])  # warm-up: lazy init costs ~1 s
        idle_one, idle_many = _compare(many, epochs, repeats, ds.x_train, ds.y_train)
        stop = mp.Event()
        neighbour = mp.Process(target=_spin, args=(stop,), daemon=True)
        neighbour.start()
        try:
            busy_one, busy_many = _compare(many, epochs, repeats, ds.x_train, ds.y_train)
        finally:
            stop.set()
            neighbour.join(timeout=5)
    finally:
        torch.set_num_threads(before)
    figures = {
        "idle_one_thread_s": round(idle_one, 3),
        "idle_many_threads_s": round(idle_many, 3),
        "slowdown_idle": round(idle_many / idle_one, 2),
        "busy_one_thread_s": round(busy_one, 3),
        "busy_many_threads_s": round(busy_many, 3),
        "slowdown_busy": round(busy_many / busy_one, 2),
    }
    return Result(figures, details={"many_threads": many, "epochs": epochs, "repeats": repeats})
