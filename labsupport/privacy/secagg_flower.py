"""Flower's SecAgg+ (Flower 1.42, legacy API) on chapter 01's task, for comparison with ours.

Flower implements SecAgg+ (Bell et al., CCS 2020) only in its legacy API: a ``NumPyClient``-based
``ClientApp`` with ``flwr.client.mod.secaggplus_mod``, and a ``ServerApp`` whose main runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares, reconstruction_threshold))`` with a
``LegacyContext`` around the legacy ``flwr.server.strategy.FedAvg``. Each client uploads
``[n_k, n_k * w_k]`` (its weights, not its update, clipped to ``±clipping_range`` and quantized to
``quantization_range`` levels) masked mod ``modulus_range`` (2^32 at most); the server gets the
weighted mean. The task is chapter 01's: MNIST-1D split IID over the clients, the MLP, one round of
local SGD per client via :func:`labsupport.fl.clients.local_update` with the same batch-order seeds
as :class:`labsupport.fl.server.FedAvgSimulation`.

Flower's masks come from ``numpy.random.RandomState`` (Mersenne Twister) seeded with the shared
secret XOR-folded to 32 bits (``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``):
a simulation reference, not a cryptographic PRG. Ray's start-up makes a run take tens of seconds,
so chapter 02 runs this in a test marked slow, not in the notebook's smoke run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from labsupport.data import load_dataset
from labsupport.fl.clients import TrainConfig, local_update
from labsupport.fl.selection import client_seed
from labsupport.models import build_model
from labsupport.partitions import partition

__all__ = ["client_app", "local_states", "run_flower_secaggplus"]

_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def _partition(pid: int, num_clients: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("mnist1d")
    idx = partition(ds.y_train.numpy(), num_clients, "iid", seed=seed)[pid]
    return ds.x_train[idx], ds.y_train[idx]


def local_states(
    global_state: dict[str, torch.Tensor],
    num_clients: int,
    server_round: int,
    config: TrainConfig,
    seed: int = 0,
) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Every client's state after its local update of ``server_round``, and its sample count."""
    out = []
    for pid in range(num_clients):
        x, y = _partition(pid, num_clients, seed)
        state, _ = local_update(
            build_model("mlp"),
            global_state,
            x,
            y,
            config,
            seed=client_seed(seed, server_round, pid),
        )
        out.append((state, len(y)))
    return out


def _client_fn(context: Any) -> Any:
    from flwr.client import NumPyClient

    pid = int(context.node_config["partition-id"])
    num_clients = int(context.node_config["num-partitions"])

    class MnistClient(NumPyClient):
        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = build_model("mlp")
            keys = list(model.state_dict())
            state = {
                k: torch.from_numpy(np.asarray(p).copy())
                for k, p in zip(keys, parameters, strict=True)
            }
            cfg = TrainConfig(
                local_epochs=int(config["local-epochs"]),
                batch_size=int(config["batch-size"]),
                lr=float(config["lr"]),
            )
            x, y = _partition(pid, num_clients, int(config["seed"]))
            seed = client_seed(int(config["seed"]), int(config["server-round"]), pid)
            new, _ = local_update(model, state, x, y, cfg, seed=seed)
            return [v.numpy() for v in new.values()], len(y), {}

    return MnistClient().to_client()


def _make_client_app() -> Any:
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod

    return ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])


client_app = None  # built on first use (importing flwr is slow); Ray's workers unpickle the object


def run_flower_secaggplus(
    num_clients: int = 4,
    *,
    num_rounds: int = 1,
    num_shares: int | float = 3,
    reconstruction_threshold: int | float = 2,
    local_epochs: int = 1,
    batch_size: int = 10,
    lr: float = 0.05,
    seed: int = 0,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
) -> dict[str, Any]:
    """Run FedAvg with Flower's SecAgg+ on ``num_clients`` simulated SuperNodes (Ray).

    Returns ``{"initial_state", "state_dict" (after the last round), "seconds"}``.
    """
    global client_app
    import ray
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.simulation import run_simulation

    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if client_app is None:
        client_app = _make_client_app()
    initial = {k: v.clone() for k, v in build_model("mlp", seed=seed).state_dict().items()}
    fit_config = {"local-epochs": local_epochs, "batch-size": batch_size, "lr": lr, "seed": seed}
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]),
            on_fit_config_fn=lambda server_round: {**fit_config, "server-round": server_round},
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=num_shares,
                reconstruction_threshold=reconstruction_threshold,
                clipping_range=clipping_range,
                quantization_range=quantization_range,
            )
        )
        workflow(grid, legacy)
        arrays = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        result["state_dict"] = {
            k: torch.from_numpy(np.asarray(a).copy()) for k, a in zip(initial, arrays, strict=True)
        }

    cores = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cores,
            "include_dashboard": False,
            "object_store_memory": 256 * 1024**2,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }
    saved_pythonpath = os.environ.get("PYTHONPATH")
    saved_threads = torch.get_num_threads()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend_config,
        )
    finally:
        ray.shutdown()
        if saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
        torch.set_num_threads(saved_threads)
    if "state_dict" not in result:
        raise RuntimeError("Flower's SecAgg+ run ended without a result from its ServerApp")
    return {
        "initial_state": initial,
        "state_dict": result["state_dict"],
        "seconds": time.perf_counter() - start,
    }
