"""``vectorized_clients``: 100 small-model clients trained one by one vs all at once, batched.

The cross-device setting of McMahan et al. (2017): ``K = 100`` clients, here MNIST-1D's 4,000
training samples split IID into 40 per client, the reference MLP, one local epoch of SGD (``B = 10``,
``lr = 0.05``) -- four steps per client, 400 per round. Run one after the other, those steps cost
mostly Python overhead; :func:`labsupport.fl.vectorized.vectorized_local_updates` takes each of the
four steps for all 100 clients in one batched call.

Figures:

* ``sequential_s`` / ``vectorized_s`` -- the wall time of one round's local training, as a plain loop
  of :func:`~labsupport.fl.clients.local_update` over the 100 clients and as one vectorized call
  (``method="auto"``: for this MLP, the backpropagation written out in
  :mod:`labsupport.fl.batched_mlp`); the ways are measured side by side in blocks of three rounds
  back to back (as a simulation runs them), the blocks interleaved, and the minimum of the repeats
  is kept. ``speedup`` = sequential ÷ vectorized (target >= 10).
* ``vectorized_vmap_s`` / ``speedup_vmap`` -- the same call with ``method="vmap"``, the general path
  any supported model takes (``torch.func.vmap`` over the forward pass, one autograd backward), timed
  in the same blocks. Both vectorized ways do the same arithmetic as the loop (400 steps of 10
  samples); they differ in what they add around it.
* ``max_param_diff`` -- the largest difference between the loop's client models and either vectorized
  way's in the timed round (the same computation: float rounding only).
* ``speedup_1000`` (and ``sequential_s_1000`` / ``vectorized_s_1000``) -- one round with 1,000 clients
  of the same size (40 samples each, from 50,000 generated signals): how the cost of each way grows
  with the federation (200 clients in smoke mode).
* ``round_peak_mb_<way>_<clients>`` -- how far one round raises the peak resident memory of a fresh
  process that has loaded the data (``VmHWM``, reset just before the round, minus the RSS then;
  Linux): the vectorized way holds every client's copy of the model and of its batch's activations
  at once.
* ``accuracy_sequential`` / ``accuracy_vectorized`` / ``accuracy_gap`` -- test accuracy (percent) of
  the global model after 30 FedAvg rounds (2 in smoke mode) of
  :class:`~labsupport.fl.server.FedAvgSimulation` with all 100 clients, ``vectorized=False`` and
  ``True``; the gap (vectorized minus sequential, in points) should be within one point. Thirty rounds,
  because with four SGD steps per round this MLP needs about that many to leave chance level (about
  20% at round 30) -- a gap between two untrained models would say little.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from labsupport.data import load_dataset
from labsupport.fl import (
    DataClient,
    FedAvgConfig,
    FedAvgSimulation,
    StateDict,
    TrainConfig,
    client_seed,
    clone_state,
    local_update,
)
from labsupport.fl.vectorized import vectorized_local_updates
from labsupport.models import build_model

from . import Result, Target, benchmark

NUM_CLIENTS = 100
BATCH_SIZE = 10
LR = 0.05
EPOCHS = 1
SEED = 0
TRAIN = TrainConfig(local_epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR)

ClientData = tuple[torch.Tensor, torch.Tensor]  # one client's (x, y)


def iid_clients(
    x: torch.Tensor, y: torch.Tensor, num_clients: int, seed: int = 0
) -> list[ClientData]:
    """Shuffle ``(x, y)`` and deal it into ``num_clients`` equal parts (the remainder is dropped)."""
    per_client = len(y) // num_clients
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)[: per_client * num_clients]
    return [(x[idx], y[idx]) for idx in order.split(per_client)]


def _time_rounds(
    model: nn.Module,
    global_state: StateDict,
    data: list[ClientData],
    rounds: int,
    methods: tuple[str, ...] = ("auto",),
) -> tuple[float, dict[str, float], float]:
    """Seconds per round of the sequential loop and of the vectorized call (each ``method`` of
    :func:`vectorized_local_updates`), and the largest weight difference from the sequential
    models. Each way runs ``rounds`` rounds back to back (other seeds each round), as a simulation
    runs it: timing a single call right after the other way's garbage would measure the memory
    allocator's cold start as much as the training."""
    seeds = [[client_seed(SEED, r, cid) for cid in range(len(data))] for r in range(1, rounds + 1)]
    start = time.perf_counter()
    for round_seeds in seeds:
        sequential = [
            local_update(model, global_state, x, y, TRAIN, seed=seed)[0]
            for (x, y), seed in zip(data, round_seeds, strict=True)
        ]
    sequential_s = (time.perf_counter() - start) / rounds
    times, diff = {}, 0.0
    for method in methods:
        start = time.perf_counter()
        for round_seeds in seeds:
            vectorized, _ = vectorized_local_updates(
                model,
                global_state,
                data,
                epochs=EPOCHS,
                batch_size=BATCH_SIZE,
                lr=LR,
                seeds=round_seeds,
                method=method,
            )
        times[method] = (time.perf_counter() - start) / rounds
        diff = max(  # the last round's models, each way against the sequential one
            diff,
            *(
                float((a[k] - b[k]).abs().max())
                for a, b in zip(sequential, vectorized, strict=True)
                for k in a
            ),
        )
    return sequential_s, times, diff


def _fedavg_accuracy(
    data: list[ClientData], test: ClientData, rounds: int, vectorized: bool
) -> tuple[float, float]:
    """Final test accuracy (percent) and wall time of ``rounds`` FedAvg rounds with every client."""
    clients = [DataClient(x, y) for x, y in data]
    config = FedAvgConfig(
        num_rounds=rounds, fraction_train=1.0, local_epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR,
        seed=SEED, eval_every=rounds, vectorized=vectorized,
    )  # fmt: skip
    sim = FedAvgSimulation(build_model("mlp", (40,), 10, seed=SEED), clients, test, config)
    start = time.perf_counter()
    history = sim.run(progress=False)
    return 100.0 * history.final_accuracy, time.perf_counter() - start


@benchmark(
    "vectorized_clients",
    "100 MNIST-1D MLP clients' local epoch: a loop of local_update vs one batched call",
    chapter="01",
)
def run(smoke: bool) -> Result:
    ds = load_dataset("mnist1d")
    data = iid_clients(ds.x_train, ds.y_train, NUM_CLIENTS, seed=SEED)
    repeats, rounds = (2, 2) if smoke else (5, 30)
    model = build_model("mlp", (40,), 10, seed=SEED)
    global_state = clone_state(model.state_dict())
    # Warm-up, untimed: torch.func's first call imports a lot, and the first 100-client step
    # allocates its batched buffers.
    methods = ("auto", "vmap")
    _time_rounds(model, global_state, data, 1, methods)
    sequential, vectorized, vmapped, diffs = [], [], [], []
    for _ in range(repeats):  # interleaved, so load on a shared machine hits all alike
        seq_s, vec_s, diff = _time_rounds(model, global_state, data, 3, methods)
        sequential.append(seq_s)
        vectorized.append(vec_s["auto"])
        vmapped.append(vec_s["vmap"])
        diffs.append(diff)

    # How cost grows with the federation: one round of 1,000 clients of the same size (40 samples),
    # and the peak memory of each way, each measured in a fresh process.
    big = 1000 if not smoke else 200
    big_ds = load_dataset("mnist1d", num_samples=50_000 if not smoke else 10_000)
    big_data = iid_clients(big_ds.x_train, big_ds.y_train, big, seed=SEED)[:big]
    _time_rounds(model, global_state, big_data[:50], 1)
    seq_big, big_times, _ = _time_rounds(model, global_state, big_data, 1)
    vec_big = big_times["auto"]
    memory = {
        f"round_peak_mb_{mode}_{n}": _peak_rss_mb(mode, n, smoke)
        for n in (NUM_CLIENTS, big)
        for mode in ("sequential", "vectorized")
    }

    acc_seq, sim_seq_s = _fedavg_accuracy(data, (ds.x_test, ds.y_test), rounds, vectorized=False)
    acc_vec, sim_vec_s = _fedavg_accuracy(data, (ds.x_test, ds.y_test), rounds, vectorized=True)

    figures = {
        "sequential_s": round(min(sequential), 4),
        "vectorized_s": round(min(vectorized), 4),
        "speedup": round(min(sequential) / min(vectorized), 2),
        "vectorized_vmap_s": round(min(vmapped), 4),
        "speedup_vmap": round(min(sequential) / min(vmapped), 2),
        "max_param_diff": float(max(diffs)),
        "accuracy_sequential": round(acc_seq, 2),
        "accuracy_vectorized": round(acc_vec, 2),
        "accuracy_gap": round(acc_vec - acc_seq, 2),
        f"speedup_{big}": round(seq_big / vec_big, 2),
        f"sequential_s_{big}": round(seq_big, 4),
        f"vectorized_s_{big}": round(vec_big, 4),
        **memory,
    }
    targets = {
        "speedup": Target("speedup", min=10.0, note="one round's local training, 100 clients"),
        "accuracy_gap": Target(
            "accuracy_gap", min=-1.0, max=1.0, note="points, after FedAvg rounds"
        ),
        "same_models": Target("max_param_diff", max=1e-4, note="float rounding only"),
    }
    details = {
        "num_clients": NUM_CLIENTS,
        "samples_per_client": len(data[0][1]),
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "local_epochs": EPOCHS,
        "repeats": repeats,
        "fedavg_rounds": rounds,
        "sequential_s_all": [round(t, 4) for t in sequential],
        "vectorized_s_all": [round(t, 4) for t in vectorized],
        "vectorized_vmap_s_all": [round(t, 4) for t in vmapped],
        "fedavg_seconds": {"sequential": round(sim_seq_s, 2), "vectorized": round(sim_vec_s, 2)},
    }
    return Result(figures, targets, details)


def _one_round_in_this_process(mode: str, num_clients: int, smoke: bool) -> float:
    """Run one round ``mode``'s way; return how far it raised this process's peak RSS (MB).

    Linux: the peak (``VmHWM``) is reset just before the round (``/proc/self/clear_refs``), so an
    earlier transient peak -- loading the data -- is not counted.
    """

    ds = load_dataset("mnist1d", num_samples=(50_000 if not smoke else 10_000))
    data = iid_clients(ds.x_train, ds.y_train, num_clients, seed=SEED)
    model = build_model("mlp", (40,), 10, seed=SEED)
    state = clone_state(model.state_dict())
    seeds = [client_seed(SEED, 1, c) for c in range(num_clients)]

    def one_round(clients: list[ClientData]) -> None:
        if mode == "sequential":
            for (x, y), s in zip(clients, seeds, strict=False):
                local_update(model, state, x, y, TRAIN, seed=s)
        else:
            vectorized_local_updates(
                model, state, clients, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR,
                seeds=seeds[: len(clients)],
            )  # fmt: skip

    one_round(data[:2])  # warm-up: the first step's lazy allocations are the runtime's, not ours
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    one_round(data)
    return max(0.0, _status_mb("VmHWM") - before)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (kB there) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def _peak_rss_mb(mode: str, num_clients: int, smoke: bool) -> float:
    """How much one round ``mode``'s way raises the peak resident memory (MB) of a fresh process
    that has already loaded the data (so the runtime's own memory is not counted)."""
    code = (
        "import torch, torch.func; torch.set_num_threads(1);"
        "from labsupport.bench.vectorized import _one_round_in_this_process as f;"
        f"print(f({mode!r}, {num_clients}, {smoke}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return round(float(out.stdout.strip().splitlines()[-1]), 1)
