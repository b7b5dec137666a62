"""``flower_vs_labsupport``: the same FedAvg run on Flower's Simulation Engine and on our simulator.

Chapter 01's workload (McMahan et al. 2017, Algorithm 1 on MNIST-1D): 10 clients with IID
partitions (``labsupport.partitions.partition``), the MLP, C = 1, E = 1, B = 10, lr 0.05, seed 0, 5 rounds
(2 in smoke mode). It runs once on :class:`labsupport.fl.server.FedAvgSimulation` with
:class:`~labsupport.fl.clients.DataClient` s built from the partitions, and once as the Flower app
``flower_app/fedmnist1d`` through :func:`labsupport.flower.simulation.run_flower_simulation` (Ray, one CPU per
client). The clients use the same batch order (``client_seed``), so the two runs end with the same
model up to float rounding: ``accuracy_gap`` (Flower minus labsupport, in points) must be within
+-1. ``flower_s`` and ``labsupport_s`` are wall seconds; Flower's include starting Ray and importing
torch in its workers, which ``flower_server_s`` (the ServerApp's own time) leaves out.
"""

from __future__ import annotations

import time

from labsupport.fl.clients import DataClient
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.flower.simulation import import_app, run_flower_simulation

from . import Result, Target, benchmark

NUM_CLIENTS = 10
WORKLOAD = {
    "num_rounds": 5,
    "fraction_train": 1.0,
    "local_epochs": 1,
    "batch_size": 10,
    "lr": 0.05,
    "seed": 0,
}


@benchmark(
    "flower_vs_labsupport",
    "FedAvg on MNIST-1D: Flower 1.42 simulation vs labsupport's simulator (time, accuracy)",
    chapter="01",
)
def run(smoke: bool) -> Result:
    work = {**WORKLOAD, "num_rounds": 2 if smoke else WORKLOAD["num_rounds"]}
    task = import_app()["task"]
    ds = task.load_data()
    clients = [
        DataClient(x, y) for x, y in task.client_partitions(NUM_CLIENTS, "iid", work["seed"])
    ]

    start = time.perf_counter()
    sim = FedAvgSimulation(
        task.make_model("mlp", seed=work["seed"]),
        clients,
        (ds.x_test, ds.y_test),
        FedAvgConfig(**work),
    )
    history = sim.run(progress=False)
    labsupport_s = time.perf_counter() - start

    flower = run_flower_simulation(NUM_CLIENTS, model="mlp", scheme="iid", **work)

    ours = history.final_accuracy
    theirs = flower["final_accuracy"]
    state_diff = max(
        float((flower["state_dict"][k].double() - v.double()).abs().max())
        for k, v in sim.global_state.items()
    )
    figures = {
        "flower_s": round(flower["seconds"], 2),
        "flower_server_s": round(flower["server_seconds"], 2),
        "labsupport_s": round(labsupport_s, 2),
        "accuracy_gap": round(100.0 * (theirs - ours), 2),
    }
    targets = {
        "accuracy_gap": Target(
            "accuracy_gap", -1.0, 1.0, "same partitions, seeds and batch order: same model"
        ),
    }
    details = {
        "workload": {"num_clients": NUM_CLIENTS, "model": "mlp", "scheme": "iid", **work},
        "labsupport_accuracy": history.evaluated()[1],
        "flower_accuracy": flower["accuracy"][1:],
        "initial_accuracy": flower["accuracy"][0],
        "final_state_max_abs_diff": state_diff,
        # the ServerApp's time per round: the first includes Ray's workers importing torch
        "flower_round_s": [
            round(b["seconds"] - a["seconds"], 2)
            for a, b in zip(flower["rows"], flower["rows"][1:], strict=False)
        ],
        "labsupport_round_s": [round(r.seconds, 3) for r in history.rounds],
        "slowdown": round(flower["seconds"] / labsupport_s, 1),
    }
    return Result(figures, targets, details)
