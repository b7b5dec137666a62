"""Chapter 01's Flower app, run in Flower's Simulation Engine from Python (a notebook, a benchmark).

The app is ``flower_app/fedmnist1d`` (Flower 1.42, Message API): the same FedAvg on MNIST-1D as
:class:`labsupport.fl.server.FedAvgSimulation`, written as Flower writes apps. :func:`run_flower_simulation`
runs it with ``flwr.simulation.run_simulation`` -- the Ray backend, one virtual SuperNode per client,
``backend_config={"client_resources": {"num_cpus": 1}}`` -- and returns the central accuracy per
round, the final state dict and the wall time. Chapter 01 uses it to put the two side by side
(``python -m labsupport.bench flower_vs_labsupport``); :mod:`labsupport.flower.deployment` runs the
same app on real processes instead (SuperLink + SuperNodes, ``flwr run``). The ServerApp aggregates
with any :class:`labsupport.fl.aggregators.Aggregator` through :mod:`labsupport.flower.bridge`
(``aggregator="median"``, ...), and the history comes back as the course's unified
:class:`labsupport.fl.history.History` (:meth:`~labsupport.fl.history.History.from_flower`).

How the configuration reaches the apps: ``run_simulation`` reads no ``pyproject.toml`` and gives the
ServerApp an empty ``context.run_config``, and it has no argument for one. So the ServerApp is built
by ``fedmnist1d.server_app.make_server_app(overrides, on_result=...)``: its config is the app's
defaults (``fedmnist1d.task.AppConfig``) overlaid with the overrides, and it sends the clients their
knobs in every message's ``ConfigRecord``; the ClientApp reads them from there, so it needs no
configuration of its own. The results come back through ``on_result``, since under
``run_simulation`` the ServerApp runs in a thread of this process.

``run_simulation`` is deprecated in Flower 1.42 (``flwr run`` is the supported path) but is the only
way to run an app inside a Python session; its deprecation warning is filtered out, every other
warning and error of Flower's is shown, and Ray is started small (``num_cpus`` = the machine's cores,
no dashboard, a 256 MB object store) and shut down afterwards.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from labsupport.fl.history import History

from .processes import OFFLINE_ENV, descendants

__all__ = ["APP_DIR", "import_app", "run_flower_simulation"]

#: ``flower_app/`` in the repository: the Flower app chapter 01 runs (``$LAB_FLOWER_APP`` overrides).
APP_DIR = Path(os.environ.get("LAB_FLOWER_APP", Path(__file__).resolve().parents[2] / "flower_app"))
APP_PACKAGE = "fedmnist1d"


def import_app(app_dir: str | os.PathLike | None = None) -> dict[str, ModuleType]:
    """Import the app's ``task``, ``client_app`` and ``server_app`` modules (``app_dir`` on sys.path).

    Ray's workers inherit this process's ``sys.path`` (Flower passes it on as ``PYTHONPATH``), so they
    can unpickle the ClientApp.
    """
    folder = Path(app_dir) if app_dir is not None else APP_DIR
    if not (folder / APP_PACKAGE / "__init__.py").exists():
        raise FileNotFoundError(
            f"no Flower app package {APP_PACKAGE!r} in {folder}; pass app_dir= (the folder holding "
            f"pyproject.toml and {APP_PACKAGE}/) or set LAB_FLOWER_APP"
        )
    path = str(folder.resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    loaded = sys.modules.get(APP_PACKAGE)
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent.parent != Path(path):
        raise ImportError(
            f"a different {APP_PACKAGE!r} is already imported from {loaded.__file__}; "
            f"restart the kernel to run the app in {folder}"
        )
    return {
        name: importlib.import_module(f"{APP_PACKAGE}.{name}")
        for name in ("task", "client_app", "server_app")
    }


class _QuietFlower(logging.Filter):
    """Drop ``run_simulation``'s deprecation notice and Flower's INFO chatter; keep its problems.

    Kept: WARNING and above (but FedAvg's notice that federated evaluation is off, the app's
    default), and the INFO lines in which a strategy reports a client's error reply.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "DEPRECATED FEATURE" in text and "run_simulation" in text:
            return False
        if text.startswith("fraction_evaluate is set to 0.0"):  # the app's deliberate default
            return False
        if record.levelno >= logging.WARNING:
            return True
        return "Received error in reply" in text or (
            "failures" in text and not text.endswith(" 0 failures")
        )


def run_flower_simulation(
    num_supernodes: int = 10,
    *,
    num_rounds: int | None = None,
    fraction_train: float | None = None,
    fraction_evaluate: float | None = None,
    local_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    model: str = "mlp",
    scheme: str = "iid",
    aggregator: str | None = None,
    num_cpus_per_client: int = 1,
    app_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the Flower app with ``run_simulation`` on ``num_supernodes`` virtual SuperNodes (Ray).

    Arguments left at ``None`` take the app's defaults (``fedmnist1d.task.AppConfig``: 5 rounds,
    C = 1, 1 local epoch, B = 10, lr 0.05, seed 0, ``aggregator="weighted-mean"``, i.e. FedAvg);
    ``batch_size=0`` is full batch; ``aggregator`` is a name of
    :func:`labsupport.flower.bridge.make_aggregator` (``"median"``, ``"trimmed-mean:0.1"``, ...). Client ``i`` holds
    partition ``i`` of ``labsupport.partitions.partition(y_train, num_supernodes, scheme, seed=seed)``.
    ``num_cpus_per_client`` is the Ray resource each ClientApp asks for, so at most
    ``cores // num_cpus_per_client`` clients train at once. ``verbose`` shows Flower's INFO log and
    Ray's output. Offline defaults (no telemetry, no Ray usage stats, Hugging Face offline) are set
    in ``os.environ`` where unset; ``PYTHONPATH`` and torch's thread count are restored afterwards.

    Returns ``{"history": History, "rows": [{"round", "accuracy", "loss", "train_loss", ...}],
    "rounds", "accuracy", "loss", "initial_accuracy", "final_accuracy", "state_dict", "seconds"
    (wall, Ray start-up included), "server_seconds" (the ServerApp's own time), "config"}``.
    ``history`` is :meth:`History.from_flower` of the rows (rounds 1..T); ``rows``, ``rounds``,
    ``accuracy`` and ``loss`` start at round 0, the initial model.
    """
    if not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ValueError(f"num_supernodes must be a positive integer, got {num_supernodes!r}")
    if not isinstance(num_cpus_per_client, int) or num_cpus_per_client < 1:
        raise ValueError(
            f"num_cpus_per_client must be a positive integer, got {num_cpus_per_client!r}"
        )
    cores = os.cpu_count() or 1
    if num_cpus_per_client > cores:
        raise ValueError(
            f"num_cpus_per_client={num_cpus_per_client} but this machine has {cores} cores"
        )
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)

    start = time.perf_counter()
    modules = import_app(app_dir)
    given = {
        "num-server-rounds": num_rounds,
        "fraction-train": fraction_train,
        "fraction-evaluate": fraction_evaluate,
        "local-epochs": local_epochs,
        "batch-size": batch_size,
        "lr": lr,
        "seed": seed,
        "model": model,
        "partition-scheme": scheme,
        "aggregator": aggregator,
        "num-partitions": num_supernodes,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    config = modules["task"].AppConfig.from_run_config(overrides)  # validate before Ray starts
    modules["task"].make_model(config.model)
    results: dict[str, Any] = {}
    server_app = modules["server_app"].make_server_app(overrides, on_result=results.update)

    import ray
    from flwr.simulation import run_simulation
    from flwr.supercore import telemetry

    if os.environ.get("FLWR_TELEMETRY_ENABLED") == "0":
        telemetry.FLWR_TELEMETRY_ENABLED = "0"  # read once at import; flwr may be imported already

    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cores,
            "include_dashboard": False,
            "object_store_memory": 256 * 1024**2,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }
    flwr_logger = logging.getLogger("flwr")
    quiet = _QuietFlower()
    saved_pythonpath = os.environ.get("PYTHONPATH")
    saved_threads = torch.get_num_threads()
    if not verbose:
        flwr_logger.addFilter(quiet)
    try:
        run_simulation(
            server_app=server_app,
            client_app=modules["client_app"].app,
            num_supernodes=num_supernodes,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        ray.shutdown()  # also after a failed start: it tears down a half-started node
        _stop_ray_processes()
        flwr_logger.removeFilter(quiet)
        if saved_pythonpath is None:  # Flower's Ray backend rewrites PYTHONPATH in os.environ
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
        torch.set_num_threads(saved_threads)
    if results.get("status") != "completed":
        raise RuntimeError(
            "the Flower simulation ended without results from its ServerApp; "
            "run again with verbose=True to see Flower's log"
        )
    rows = results["history"]
    return {
        "history": History.from_flower(rows),
        "rows": rows,
        "rounds": [r["round"] for r in rows],
        "accuracy": [r["accuracy"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "initial_accuracy": rows[0]["accuracy"] if rows else None,
        "final_accuracy": results["final_accuracy"],
        "state_dict": results["state_dict"],
        "seconds": time.perf_counter() - start,
        "server_seconds": results["seconds"],
        "config": config.to_run_config(),
    }


def _stop_ray_processes(timeout: float = 15.0) -> None:
    """``ray.shutdown`` returns before Ray's processes have exited, and leaves them running when Ray
    failed to start (e.g. "node timed out during startup" on a loaded machine): wait for this
    process's Ray children (bounded), then SIGTERM and SIGKILL the ones left, by pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _ray_children():
            return
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _ray_children():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 5.0
        while _ray_children() and time.monotonic() < deadline:
            time.sleep(0.1)


def _ray_children() -> list[int]:
    return [pid for pid, cmd in descendants(os.getpid()) if "ray" in cmd]
