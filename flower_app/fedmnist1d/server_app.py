"""The ServerApp: Flower's FedAvg loop with a labsupport aggregator, evaluated centrally on MNIST-1D.

Flower pieces: ``flwr.serverapp.ServerApp`` with an ``@app.main()`` function that gets a ``Grid``
(the link to the SuperNodes) and a ``Context`` (``run_config`` = ``[tool.flwr.app.config]`` plus
``flwr run --run-config`` overrides); a strategy driven by ``strategy.start(grid, initial_arrays,
num_rounds, train_config=..., evaluate_fn=...)``, which each round sends the global ``ArrayRecord``
with a ``ConfigRecord`` to the sampled nodes, aggregates the replies, and calls
``evaluate_fn(round, arrays)`` -- here the central test of :func:`labsupport.train.evaluate`, as our
in-process simulator does. The strategy is :class:`labsupport.flower.bridge.AggregatorStrategy`:
Flower's ``FedAvg`` (sampling, messages, evaluation) whose aggregation is the labsupport
``Aggregator`` named by the ``aggregator`` knob -- ``"weighted-mean"`` (FedAvg, McMahan et al. 2017),
or chapter 03's ``"median"``, ``"trimmed-mean:0.1"``, ``"krum:1"`` -- so each rule is written once.
Replies that fail validation (NaN, wrong shapes, a non-positive count) are rejected and recorded
instead of averaged; a round in which no client trained stops the run.

The initial model is ``build_model(model, seed=seed)``, the simulator's; the strategy waits for all
``num-partitions`` nodes (``min_available_nodes``) and samples ``max(C * K, 1)`` of them (C * K
rounded half up, as our simulator does). With ``fraction-train = 1`` every round uses every client,
so a run equals the simulator's (chapter 01's comparison, ``python -m labsupport.bench
flower_vs_labsupport``). With C < 1 Flower samples nodes with Python's unseeded ``random``: other
clients than the simulator's.

Results: with ``results-file`` set, a JSON file (``status``, ``config``, ``history`` of
``round``/``accuracy``/``loss``/``train_loss``/``clients``/``errors``, ``final_accuracy``,
``seconds``) rewritten after every round, and the final state dict next to it (``.pt``);
:meth:`labsupport.fl.history.History.from_flower` reads the history. :func:`make_server_app` builds
the app with config overrides and a callback, for ``run_simulation``
(:mod:`labsupport.flower.simulation`), where no pyproject is read and the results come back
in-process.

User-level DP (chapter 02): ``dp-noise-multiplier`` σ and ``dp-clipping-norm`` S, both > 0, replace
the aggregator by Flower's ``FedAvg`` with equal client weights wrapped in
``DifferentialPrivacyServerSideFixedClipping`` (:func:`dp_strategy`), and the results gain a ``dp``
entry: the ε of Flower's ``RdpAccountant`` at δ = 1e-5 -- without client-sampling amplification,
the only accounting Flower 1.42's wrappers accept. :func:`extra_run_config` passes such knobs to an
app built by a helper that has no argument for them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedmnist1d.task import DP_WEIGHT_KEY, AppConfig, load_data, make_model, test
from labsupport.device import set_threads
from labsupport.fl.selection import num_selected
from labsupport.fl.state import clone_state
from labsupport.flower.bridge import AggregatorStrategy, make_aggregator

__all__ = ["app", "dp_strategy", "dp_summary", "extra_run_config", "make_server_app", "run_fedavg"]

#: δ of the ε Flower's accountant reports when user-level DP is on.
DP_DELTA = 1e-5


def run_fedavg(
    grid: Grid,
    config: AppConfig,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``config.num_server_rounds`` rounds over ``grid`` with ``config.aggregator``; return results.

    Returns ``{"status", "config", "history", "final_accuracy", "seconds", "model_file",
    "state_dict"}``; ``history`` has one row per central evaluation, round 0 being the initial model.
    ``on_round(row)`` is called after each evaluation.
    """
    start = time.perf_counter()
    ds = load_data()
    model = make_model(config.model, seed=config.seed)
    initial_state = clone_state(model.state_dict())
    path = Path(config.results_file).expanduser() if config.results_file else None
    history: list[dict[str, Any]] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = test(model, ds.x_test, ds.y_test)
        row = {
            "round": server_round,
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        if on_round is not None:
            on_round(dict(row))
        if path is not None:
            _write_json(path, _payload("running", config, history, start))
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    k = config.num_partitions
    sampling = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": num_selected(k, config.fraction_evaluate)
        if config.fraction_evaluate
        else 0,
        "min_available_nodes": k,
    }
    strategy = (
        dp_strategy(config, sampling)
        if config.dp
        else AggregatorStrategy(make_aggregator(config.aggregator), **sampling)
    )
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial_state),
            num_rounds=config.num_server_rounds,
            train_config=ConfigRecord(config.client_config()),
            evaluate_config=ConfigRecord(config.client_config()),
            evaluate_fn=central_evaluate,
        )
    except BaseException as exc:
        if path is not None:
            _write_json(path, {**_payload("failed", config, history, start), "error": repr(exc)})
        raise

    rounds = getattr(strategy, "rounds", {})  # the DP wrapper around Flower's FedAvg has none
    for (
        row
    ) in history:  # who was averaged, who failed or was rejected; metrics num-examples-weighted
        outcome = rounds.get(row["round"])
        row["clients"] = sorted(outcome.clients) if outcome else []
        row["errors"] = (
            outcome.errors + [f"client {c}: {why}" for c, why in outcome.rejected.items()]
            if outcome
            else []
        )
        train = result.train_metrics_clientapp.get(row["round"])
        row["train_loss"] = float(train["train_loss"]) if train and "train_loss" in train else None
        fed = result.evaluate_metrics_clientapp.get(row["round"])
        if fed:
            row["federated_accuracy"] = float(fed["eval_acc"])
            row["federated_loss"] = float(fed["eval_loss"])
    final_state = result.arrays.to_torch_state_dict() if len(result.arrays) else initial_state
    final_state = {k: v.clone() for k, v in final_state.items()}
    payload = _payload("completed", config, history, start)
    if config.dp:
        payload["dp"] = dp_summary(strategy, config)
    if path is not None:
        model_file = path.with_suffix(".pt")
        model_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(final_state, model_file)
        payload["model_file"] = str(model_file)
        _write_json(path, payload)
    return {**payload, "state_dict": final_state}


def dp_strategy(config: AppConfig, sampling: Mapping[str, Any]) -> Strategy:
    """DP-FedAvg with Flower's own pieces: ``FedAvg`` weighing every client equally (by the
    ``dp-weight`` the clients report), wrapped in ``DifferentialPrivacyServerSideFixedClipping``
    (clip each update to S, add N(0, (σS/m)²) to the average, m = clients per round), with Flower's
    ``RdpAccountant``. Flower 1.42's fixed-clipping wrappers accept that accountant only with
    ``sampling_method='no-amplification'``: the ε it reports ignores client sampling."""
    from flwr.serverapp import PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.supercore.privacy_accounting import NeighboringRelation

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=DP_DELTA,
            population_size=config.num_partitions,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    return DifferentialPrivacyServerSideFixedClipping(
        FedAvg(weighted_by_key=DP_WEIGHT_KEY, **sampling),
        noise_multiplier=config.dp_noise_multiplier,
        clipping_norm=config.dp_clipping_norm,
        num_sampled_clients=config.min_train_nodes,
        accountant=accountant,
    )


def dp_summary(strategy: Strategy, config: AppConfig) -> dict[str, Any]:
    """What Flower's accountant says was spent, with everything an ε needs to mean something."""
    spent = strategy.privacy_spent()
    return {
        "epsilon": float(spent.epsilon) if spent is not None else 0.0,
        "delta": DP_DELTA,
        "releases": int(spent.num_releases) if spent is not None else 0,
        "noise_multiplier": config.dp_noise_multiplier,
        "clipping_norm": config.dp_clipping_norm,
        "clients_per_round": config.min_train_nodes,
        "num_clients": config.num_partitions,
        "accountant": "Flower RdpAccountant",
        "sampling": "no amplification (the only one Flower's fixed-clipping wrappers accept)",
        "neighbouring": "add/remove one client (user-level)",
    }


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp whose config is ``AppConfig()`` <- ``context.run_config`` <- ``overrides``.

    ``on_round(row)`` sees every central evaluation and ``on_result(results)`` the final results
    (with the final ``state_dict``), in the ServerApp's process -- which, under ``run_simulation``,
    is the caller's.
    """
    extra = {**_OVERLAY, **dict(overrides or {})}
    AppConfig.from_run_config(extra)  # fail here, not inside Flower's thread, on a bad key/value
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        set_threads()
        config = AppConfig.from_run_config({**context.run_config, **extra})
        results = run_fedavg(grid, config, on_round=on_round)
        if on_result is not None:
            on_result(results)

    return app


_OVERLAY: dict[str, Any] = {}


@contextmanager
def extra_run_config(overrides: Mapping[str, Any]) -> Iterator[None]:
    """Knobs that every :func:`make_server_app` built inside this block gets beneath its own overrides.

    For callers that build the app for you and have no argument for a knob:
    ``with extra_run_config({"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5}):
    run_flower_simulation(...)``. Checked on entry; the previous overlay is restored on exit.
    """
    AppConfig.from_run_config(dict(overrides))
    saved = dict(_OVERLAY)
    _OVERLAY.update(overrides)
    try:
        yield
    finally:
        _OVERLAY.clear()
        _OVERLAY.update(saved)


def _payload(status: str, config: AppConfig, history: list[dict], start: float) -> dict[str, Any]:
    evaluated = [r["accuracy"] for r in history]
    return {
        "status": status,
        "config": config.to_run_config(),
        "history": [dict(r) for r in history],
        "final_accuracy": evaluated[-1] if evaluated else None,
        "seconds": time.perf_counter() - start,
        "model_file": None,
        "flwr_version": flwr.__version__,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


app = make_server_app()
