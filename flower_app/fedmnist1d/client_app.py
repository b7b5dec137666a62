"""The ClientApp: what each SuperNode runs when the ServerApp's FedAvg sends it a message.

Flower pieces: ``flwr.clientapp.ClientApp`` with ``@app.train()`` and ``@app.evaluate()`` handlers
(the Message API, Flower >= 1.21); a ``Message`` whose ``RecordDict`` content holds the global model
as an ``ArrayRecord`` (key ``"arrays"``) and the knobs as a ``ConfigRecord`` (key ``"config"``, with
Flower's ``server-round``); the reply carries an ``ArrayRecord`` and a ``MetricRecord`` whose
``"num-examples"`` is the sample count the server weighs it by, and a ``ConfigRecord`` ``"client"``
with the node's ``partition-id`` (the client id :mod:`labsupport.flower.bridge` records). Which
partition this node holds comes from ``context.node_config`` (``partition-id``, ``num-partitions``):
``--node-config`` on a real SuperNode, set by the Simulation Engine under ``run_simulation``.

The knobs come from the message's ConfigRecord, overlaid on ``context.run_config`` and the defaults of
:class:`fedmnist1d.task.AppConfig`: the ServerApp is the one place the run configuration is read, so
the client behaves the same under ``flwr run`` and ``run_simulation`` (where ``run_config`` is
empty). With user-level DP on (``dp-clipping-norm`` > 0 in the message) the reply's metrics also
carry ``"dp-weight": 1``, the equal weight the server's DP-FedAvg averages by. Chapter 01 calls these handlers directly in ``tests/flower/test_flower_simulation.py`` to
show that one round of Flower's FedAvg over them equals one round of our in-process simulator.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmnist1d.task import (
    DP_WEIGHT_KEY,
    AppConfig,
    check_partition_id,
    load_partition,
    make_model,
    partition_indices,
    test,
)
from fedmnist1d.task import train as train_locally
from labsupport.device import set_threads

app = ClientApp()


def _node(message: Message, context: Context) -> tuple[AppConfig, int, int]:
    """``(config, partition_id, server_round)`` for this node and message."""
    sent = dict(message.content["config"]) if "config" in message.content else {}
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "this SuperNode has no partition-id in its node config; start it with "
            "--node-config 'partition-id=I num-partitions=N'"
        )
    overlay = {**context.run_config, **sent}
    if "num-partitions" in node:  # the node's own view wins over the run's default
        overlay["num-partitions"] = node["num-partitions"]
    config = AppConfig.from_run_config(overlay, ignore_unknown=True)
    check_partition_id(node["partition-id"], config.num_partitions)
    return config, int(node["partition-id"]), int(sent.get("server-round", 0))


def _data(context: Context, config: AppConfig, partition_id: int, split: str) -> tuple:
    """This node's ``(x, y)``. The indices are kept in ``context.state``, which the SuperNode keeps
    across the run's messages: under the Deployment Engine every message starts a fresh
    ``flwr-clientapp`` process, and partitioning again would cost seconds each round."""
    key = f"partition-{split}-{config.partition_scheme}-{config.num_partitions}-{config.seed}"
    if key not in context.state:
        indices = partition_indices(
            config.num_partitions, config.partition_scheme, config.seed, split=split
        )[partition_id]
        context.state[key] = ArrayRecord([indices])
    (indices,) = context.state[key].to_numpy_ndarrays()
    return load_partition(partition_id, config.num_partitions, split=split, indices=indices)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Load the global arrays, run ``local_update`` on this node's partition, reply with the result."""
    set_threads()
    config, partition_id, server_round = _node(message, context)
    x, y = _data(context, config, partition_id, "train")
    model = make_model(config.model)
    global_state = message.content["arrays"].to_torch_state_dict()
    state, result = train_locally(model, global_state, x, y, config, server_round, partition_id)
    metrics = {"num-examples": len(y), "train_loss": float(result.loss)}
    if config.dp:  # DP-FedAvg averages with equal weights: a weight n_k/n would let a client's
        metrics[DP_WEIGHT_KEY] = 1  # influence grow past S/m (the server weighs by this key)
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"partition-id": partition_id}),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Test the global arrays on this node's share of the MNIST-1D test set."""
    set_threads()
    config, partition_id, _ = _node(message, context)
    x, y = _data(context, config, partition_id, "test")
    model = make_model(config.model)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    metrics = test(model, x, y)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": len(y),
                    "eval_loss": metrics["loss"],
                    "eval_acc": metrics["accuracy"],
                }
            )
        }
    )
    return Message(content=content, reply_to=message)
