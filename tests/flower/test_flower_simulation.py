"""Chapter 01's Flower app (``flower_app/fedmnist1d``) against labsupport's own FedAvg, without Ray.

The ClientApp is called as Flower calls it -- ``app(message, context)`` with a ``Message`` built by
hand -- and Flower's own ``FedAvg`` aggregates the replies; the reference is
:class:`labsupport.fl.server.FedAvgSimulation`, which shares no code with Flower's aggregation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (
    Context,
    MessageType,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from labsupport.fl.clients import DataClient, TrainConfig, local_update
from labsupport.fl.selection import client_seed
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.flower.simulation import APP_DIR
from labsupport.train import evaluate

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from flower_testlib import (
    FlakyGrid,
    InProcessGrid,
    client_app,
    instruction,
    make_context,
    make_message,
    max_abs_diff,
    server_app,
    task,
)


def test_pyproject_run_config_equals_the_app_defaults():
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    flwr_app = pyproject["tool"]["flwr"]["app"]
    assert flwr_app["config"] == task.AppConfig().to_run_config()
    assert flwr_app["components"] == {
        "serverapp": "fedmnist1d.server_app:app",
        "clientapp": "fedmnist1d.client_app:app",
    }
    assert isinstance(server_app.app, server_app.ServerApp)
    assert isinstance(client_app.app, client_app.ClientApp)


def test_app_config_names_a_mistyped_key_and_a_bad_value():
    with pytest.raises(ValueError, match="learning-rate"):
        task.AppConfig.from_run_config({"learning-rate": 0.1})
    with pytest.raises(TypeError, match="local-epochs"):
        task.AppConfig.from_run_config({"local-epochs": "2"})
    with pytest.raises(ValueError, match="fraction-train"):
        task.AppConfig.from_run_config({"fraction-train": 0.0})
    # TOML writes `lr = 1` as an int; a float knob accepts it
    assert task.AppConfig.from_run_config({"lr": 1}).lr == 1.0
    # Flower's own `server-round` rides along in a message's ConfigRecord
    cfg = task.AppConfig.from_run_config({"server-round": 3, "seed": 7}, ignore_unknown=True)
    assert cfg.seed == 7


# --------------------------------------------------------------------------------------- ClientApp


def test_client_train_reply_is_labsupport_local_update_with_the_simulator_seed():
    config = task.AppConfig(num_partitions=10, seed=3)
    model = task.make_model("mlp", seed=3)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    reply = client_app.app(
        make_message(instruction(global_state, config, server_round=2), MessageType.TRAIN, 104),
        make_context(4, 10),
    )
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == "m"
    metrics = reply.content["metrics"]
    x, y = task.client_partitions(10, "iid", 3)[4]
    assert metrics["num-examples"] == len(y) == 400

    expected, result = local_update(
        task.make_model("mlp"), global_state, x, y, TrainConfig(1, 10, 0.05),
        seed=client_seed(3, 2, 4),
    )  # fmt: skip
    got = reply.content["arrays"].to_torch_state_dict()
    assert max_abs_diff(got, expected) == 0.0
    assert metrics["train_loss"] == pytest.approx(result.loss)
    assert max_abs_diff(got, global_state) > 0  # it did train


def test_client_evaluate_reports_the_node_test_partition():
    config = task.AppConfig(num_partitions=4)
    model = task.make_model("mlp", seed=0)
    reply = client_app.app(
        make_message(instruction(model.state_dict(), config, 1), MessageType.EVALUATE, 102),
        make_context(2, 4),
    )
    x, y = task.client_partitions(4, "iid", 0, split="test")[2]
    expected = evaluate(model, x, y)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(y) == 250
    assert metrics["eval_acc"] == pytest.approx(expected["accuracy"])
    assert metrics["eval_loss"] == pytest.approx(expected["loss"])
    assert "arrays" not in reply.content


def test_client_keeps_its_partition_in_context_state_across_messages():
    config = task.AppConfig(num_partitions=4)
    context = make_context(1, 4)
    model = task.make_model("mlp", seed=0)
    client_app.app(
        make_message(instruction(model.state_dict(), config, 1), MessageType.TRAIN, 101), context
    )
    key = "partition-train-iid-4-0"
    assert key in context.state
    (kept,) = context.state[key].to_numpy_ndarrays()
    np.testing.assert_array_equal(kept, task.partition_indices(4)[1])


def test_client_without_partition_id_says_how_to_start_the_supernode():
    config = task.AppConfig(num_partitions=2)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    model = task.make_model("mlp", seed=0)
    with pytest.raises(ValueError, match="--node-config"):
        client_app.app(
            make_message(instruction(model.state_dict(), config, 1), MessageType.TRAIN, 5), context
        )


def test_client_partition_id_out_of_range_is_rejected():
    config = task.AppConfig(num_partitions=2)
    model = task.make_model("mlp", seed=0)
    with pytest.raises(ValueError, match="partition-id 2 is outside 0..1"):
        client_app.app(
            make_message(instruction(model.state_dict(), config, 1), MessageType.TRAIN, 5),
            make_context(2, 2),
        )


# ------------------------------------------------------------------------------ FedAvg equivalence


@pytest.mark.parametrize("scheme", ["iid", "quantity"])  # quantity: unequal n_k, so weights matter
def test_one_round_of_flower_fedavg_equals_one_round_of_labsupport(scheme):
    k, seed = 6, 11
    config = task.AppConfig(num_partitions=k, partition_scheme=scheme, seed=seed)
    initial = task.make_model("mlp", seed=seed).state_dict()

    replies = [
        client_app.app(
            make_message(instruction(initial, config, 1), MessageType.TRAIN, 100 + i, f"m{i}"),
            make_context(i, k),
        )
        for i in range(k)
    ]
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=k, min_available_nodes=k)
    arrays, metrics = strategy.aggregate_train(1, replies)
    flower_state = arrays.to_torch_state_dict()

    clients = [DataClient(x, y) for x, y in task.client_partitions(k, scheme, seed)]
    sizes = [c.num_samples for c in clients]
    if scheme == "quantity":
        assert len(set(sizes)) > 1
    sim = FedAvgSimulation(
        task.make_model("mlp", seed=seed),
        clients,
        test=None,
        config=FedAvgConfig(
            num_rounds=1, fraction_train=1.0, local_epochs=1, batch_size=10, lr=0.05, seed=seed
        ),
    )
    record = sim.run_round()
    assert record.clients == list(range(k)) and not record.rejected
    assert max_abs_diff(flower_state, sim.global_state) < 1e-6
    assert max_abs_diff(flower_state, initial) > 1e-3
    # Flower's MetricRecord average is weighted by num-examples too
    losses = [float(r.content["metrics"]["train_loss"]) for r in replies]
    assert metrics["train_loss"] == pytest.approx(np.average(losses, weights=sizes))


# ------------------------------------------------------------------------- ServerApp, in process


def test_server_app_two_rounds_match_labsupport_and_write_the_results_file(tmp_path, task_identity):
    k = 3
    results_file = tmp_path / "out" / "results.json"
    config = task.AppConfig(num_server_rounds=2, num_partitions=k, results_file=str(results_file))
    seen: list[dict] = []
    out = server_app.run_fedavg(InProcessGrid(k), config, on_round=seen.append)

    sim = FedAvgSimulation(
        task.make_model("mlp", seed=0),
        [DataClient(x, y) for x, y in task.client_partitions(k)],
        test=(task.load_data().x_test, task.load_data().y_test),
        config=FedAvgConfig(num_rounds=2, fraction_train=1.0, batch_size=10, lr=0.05, seed=0),
    )
    history = sim.run(progress=False)
    assert [r["round"] for r in out["history"]] == [0, 1, 2] == [r["round"] for r in seen]
    for row, rec in zip(out["history"][1:], history.rounds, strict=True):
        assert row["accuracy"] == pytest.approx(rec.accuracy, abs=1e-9)
        assert row["loss"] == pytest.approx(rec.loss, abs=1e-5)
        assert math.isfinite(row["train_loss"])
    assert max_abs_diff(out["state_dict"], sim.global_state) < 1e-6

    saved = json.loads(results_file.read_text())
    assert saved["status"] == "completed"
    assert saved["history"] == json.loads(json.dumps(out["history"]))
    assert saved["config"]["num-server-rounds"] == 2
    model_state = torch.load(saved["model_file"])
    assert max_abs_diff(model_state, out["state_dict"]) == 0.0
    assert [(r["clients"], r["errors"]) for r in out["history"][1:]] == [([0, 1, 2], [])] * 2


def test_server_app_records_a_failed_client_and_averages_the_others(task_identity):
    config = task.AppConfig(num_server_rounds=1, num_partitions=3)
    out = server_app.run_fedavg(FlakyGrid(3, failing={1}), config)
    assert out["history"][1]["clients"] == [0, 2]
    assert out["history"][1]["errors"] == ["ClientApp raised boom"]

    # FedAvg over the survivors, clients 0 and 2, weighted by their sample counts
    initial = task.make_model("mlp", seed=0).state_dict()
    parts = task.client_partitions(3)
    states = [
        local_update(
            task.make_model("mlp"), initial, *parts[i], TrainConfig(), seed=client_seed(0, 1, i)
        )[0]
        for i in (0, 2)
    ]
    n0, n2 = len(parts[0][1]), len(parts[2][1])
    expected = {k: (n0 * states[0][k] + n2 * states[1][k]) / (n0 + n2) for k in initial}
    assert max_abs_diff(out["state_dict"], expected) < 1e-6


def test_server_app_fails_loudly_when_no_client_trained(tmp_path, task_identity):
    results_file = tmp_path / "results.json"
    config = task.AppConfig(num_server_rounds=2, num_partitions=2, results_file=str(results_file))
    with pytest.raises(RuntimeError, match="none of the 2 sampled clients trained"):
        server_app.run_fedavg(FlakyGrid(2, failing={0, 1}), config)
    saved = json.loads(results_file.read_text())
    assert saved["status"] == "failed" and "boom" in saved["error"]
    assert [r["round"] for r in saved["history"]] == [0]


def test_make_server_app_rejects_a_bad_override_before_anything_runs():
    with pytest.raises(ValueError, match="num-rounds"):
        server_app.make_server_app({"num-rounds": 3})


def test_run_flower_simulation_rejects_bad_arguments_before_starting_ray():
    from labsupport.flower.simulation import run_flower_simulation

    with pytest.raises(ValueError, match="num_supernodes"):
        run_flower_simulation(0)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        run_flower_simulation(2, model="nope")
    with pytest.raises(ValueError, match="partition-scheme 'nope'"):
        run_flower_simulation(2, scheme="nope")
    with pytest.raises(ValueError, match="lr must be > 0"):
        run_flower_simulation(2, lr=0.0)
    import ray

    assert not ray.is_initialized()
