"""labsupport Aggregators inside Flower (:mod:`labsupport.flower.bridge`), without Ray.

The reference for every aggregation is our in-process server, :class:`FedAvgSimulation`, with the
same aggregator on the same clients, or an independent numpy computation over the replies. The
replies come from the app's real ClientApp (called as a SuperNode calls it) or are built by hand.
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest
import torch
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
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian

from labsupport.fl.aggregators import Aggregator, WeightedMean
from labsupport.fl.clients import DataClient
from labsupport.fl.history import History
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.flower.bridge import (
    AGGREGATORS,
    AggregatorStrategy,
    decode_instructions,
    encode_instructions,
    make_aggregator,
    parse_aggregator,
    register_aggregator,
)

robust = pytest.importorskip("labsupport.fl.robust")


@functools.cache
def _trained(k: int, seed: int, scheme: str) -> tuple[dict, tuple]:
    """The initial state and the k round-1 train replies of the app's real ClientApp (once)."""
    config = task.AppConfig(num_partitions=k, partition_scheme=scheme, seed=seed)
    initial = task.make_model("mlp", seed=seed).state_dict()
    replies = [
        client_app.app(
            make_message(instruction(initial, config, 1), MessageType.TRAIN, 100 + i, f"m{i}"),
            make_context(i, k),
        )
        for i in range(k)
    ]
    return initial, tuple(replies)


def _app_replies(k: int, seed: int, scheme: str) -> tuple[dict, list[Message]]:
    """Fresh copies of :func:`_trained`'s replies (some strategies consume what they are given)."""
    initial, replies = _trained(k, seed, scheme)
    fresh = []
    for m in replies:
        content = RecordDict(
            {
                "arrays": ArrayRecord(m.content["arrays"].to_torch_state_dict()),
                "metrics": MetricRecord(dict(m.content["metrics"])),
                "client": ConfigRecord(dict(m.content["client"])),
            }
        )
        fresh.append(Message(content=content, metadata=m.metadata))
    return {k: v.clone() for k, v in initial.items()}, fresh


def _simulator_round(k: int, seed: int, scheme: str, aggregator: Aggregator) -> FedAvgSimulation:
    sim = FedAvgSimulation(
        task.make_model("mlp", seed=seed),
        [DataClient(x, y) for x, y in task.client_partitions(k, scheme, seed)],
        test=None,
        config=FedAvgConfig(
            num_rounds=1, fraction_train=1.0, local_epochs=1, batch_size=10, lr=0.05, seed=seed
        ),
        aggregator=aggregator,
    )
    record = sim.run_round()
    assert record.clients == list(range(k)) and not record.rejected
    return sim


def _reply(state: dict, num_examples: float, node: int, metrics: dict | None = None) -> Message:
    """A train reply built by hand (NOTES.md's recipe): fresh for every call."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, **(metrics or {})}),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"i{node}",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def _toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


# ------------------------------------------------------------------ same model as the simulator


@pytest.mark.parametrize("scheme", ["iid", "quantity"])  # quantity: unequal n_k, weights matter
def test_weighted_mean_through_flower_equals_the_simulator_and_flower_fedavg(scheme):
    k, seed = 5, 4
    initial, replies = _app_replies(k, seed, scheme)
    strategy = AggregatorStrategy(WeightedMean(), global_state=initial)
    arrays, metrics = strategy.aggregate_train(1, replies)
    ours = arrays.to_torch_state_dict()

    sim = _simulator_round(k, seed, scheme, WeightedMean())
    assert max_abs_diff(ours, sim.global_state) < 1e-6
    assert max_abs_diff(ours, initial) > 1e-3
    assert max_abs_diff(ours, strategy.global_state) == 0.0  # the strategy keeps what it returned
    assert strategy.rounds[1].clients == list(range(k))  # the partition ids the clients reported
    assert strategy.rounds[1].node_ids == [100 + i for i in range(k)]

    _, fresh = _app_replies(k, seed, scheme)  # Flower's own FedAvg (float32 sums)
    flower_arrays, flower_metrics = FedAvg().aggregate_train(1, fresh)
    assert max_abs_diff(ours, flower_arrays.to_torch_state_dict()) < 1e-6
    assert metrics["train_loss"] == pytest.approx(flower_metrics["train_loss"])


def test_median_through_flower_equals_the_simulator_and_numpy():
    k, seed = 4, 2  # even count: the mean of the middle two
    initial, replies = _app_replies(k, seed, "iid")
    strategy = AggregatorStrategy(make_aggregator("median"), global_state=initial)
    ours = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()

    sim = _simulator_round(k, seed, "iid", make_aggregator("median"))
    assert max_abs_diff(ours, sim.global_state) < 1e-6

    _, fresh = _app_replies(k, seed, "iid")
    states = [m.content["arrays"].to_torch_state_dict() for m in fresh]
    for key, ref in initial.items():
        stacked = np.stack([s[key].double().numpy() for s in states])
        np.testing.assert_allclose(
            ours[key].double().numpy(), np.median(stacked, axis=0), atol=1e-6
        )
        assert ours[key].dtype == ref.dtype
    flower = FedMedian().aggregate_train(1, _app_replies(k, seed, "iid")[1])[0]
    assert max_abs_diff(ours, flower.to_torch_state_dict()) < 1e-6


def test_trimmed_mean_through_flower_matches_numpy_and_the_simulator():
    k, seed, beta = 5, 1, 0.2  # int(0.2 * 5) = 1 cut from each end
    initial, replies = _app_replies(k, seed, "quantity")
    ours = AggregatorStrategy(make_aggregator(f"trimmed-mean:{beta}"), global_state=initial)
    got = ours.aggregate_train(1, replies)[0].to_torch_state_dict()
    sim = _simulator_round(k, seed, "quantity", make_aggregator(f"trimmed-mean:{beta}"))
    assert max_abs_diff(got, sim.global_state) < 1e-6
    states = [
        m.content["arrays"].to_torch_state_dict() for m in _app_replies(k, seed, "quantity")[1]
    ]
    for key in initial:
        stacked = np.sort(np.stack([s[key].double().numpy() for s in states]), axis=0)
        np.testing.assert_allclose(got[key].double().numpy(), stacked[1:-1].mean(axis=0), atol=1e-6)


def test_krum_through_flower_picks_the_honest_cluster():
    base = _toy_state()
    honest = [
        {k: v + 0.01 * i if v.is_floating_point() else v for k, v in base.items()} for i in range(4)
    ]
    attacker = {k: v + 100.0 if v.is_floating_point() else v for k, v in base.items()}
    replies = [_reply(s, 10, node=i) for i, s in enumerate([*honest, attacker])]
    strategy = AggregatorStrategy(make_aggregator("krum:1"), global_state=base)
    got = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    assert any(max_abs_diff(got, h) == 0.0 for h in honest)  # Krum returns one client's model


# ------------------------------------------------------------------------ validation of replies


def test_a_poisoned_reply_is_rejected_and_recorded_and_the_others_averaged():
    base = _toy_state()
    good = [_toy_state(1), _toy_state(2)]
    nan = _toy_state(3)
    nan["w"][0, 0] = float("nan")
    wrong_shape = {**_toy_state(4), "b": torch.zeros(5)}
    replies = [
        _reply(good[0], 30, node=11),
        _reply(nan, 10, node=12),
        _reply(wrong_shape, 10, node=13),
        _reply(good[1], 10, node=14),
        _reply(_toy_state(5), 0, node=15),  # a zero sample count
    ]
    strategy = AggregatorStrategy(WeightedMean(), global_state=base)
    got = strategy.aggregate_train(3, replies)[0].to_torch_state_dict()
    outcome = strategy.rounds[3]
    assert outcome.clients == [11, 14]
    assert set(outcome.rejected) == {12, 13, 15}
    assert "non-finite" in outcome.rejected[12]
    assert "shape (5,)" in outcome.rejected[13]
    assert "> 0" in outcome.rejected[15]
    expected = 0.75 * good[0]["w"].double() + 0.25 * good[1]["w"].double()
    torch.testing.assert_close(got["w"].double(), expected, atol=1e-6, rtol=0)
    assert got["steps"].dtype == torch.int64 and int(got["steps"]) == 7


def test_reply_dtypes_follow_the_global_model():
    base = _toy_state()
    as_double = {k: (v.double() if v.is_floating_point() else v) for k, v in _toy_state(1).items()}
    as_float_steps = {**_toy_state(2), "steps": torch.tensor(7.0)}
    strategy = AggregatorStrategy(WeightedMean(), global_state=base)
    got = strategy.aggregate_train(1, [_reply(as_double, 1, 1), _reply(as_float_steps, 1, 2)])
    state = got[0].to_torch_state_dict()
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in base.items()}
    assert strategy.rounds[1].clients == [1]  # a float where the model has an int64: rejected
    assert "dtype" in strategy.rounds[1].rejected[2]
    torch.testing.assert_close(state["w"], as_double["w"].float())


def test_a_round_without_an_accepted_reply_raises():
    base = _toy_state()
    bad = {**_toy_state(1), "extra": torch.zeros(1)}
    strategy = AggregatorStrategy(WeightedMean(), global_state=base)
    with pytest.raises(RuntimeError, match="none of the 1 sampled clients trained"):
        strategy.aggregate_train(1, [_reply(bad, 5, 1)])
    assert "unexpected ['extra']" in strategy.rounds[1].rejected[1]


def test_aggregate_train_without_a_global_model_says_what_is_missing():
    with pytest.raises(RuntimeError, match="global_state="):
        AggregatorStrategy(WeightedMean()).aggregate_train(1, [_reply(_toy_state(), 1, 1)])
    with pytest.raises(TypeError, match="Aggregator"):
        AggregatorStrategy(FedAvg())


def test_an_aggregator_that_breaks_the_model_is_caught():
    class Broken(Aggregator):
        def aggregate(self, global_state, replies):
            return {k: v for k, v in replies[0].state.items() if k != "b"}

    strategy = AggregatorStrategy(Broken(), global_state=_toy_state())
    with pytest.raises(RuntimeError, match=r"does not fit the model.*missing \['b'\]"):
        strategy.aggregate_train(1, [_reply(_toy_state(1), 1, 1)])


# --------------------------------------------------------------------------------- instructions


class _Scaffoldish(Aggregator):
    """Sends a scalar, a tensor and a state dict of tensors, as SCAFFOLD would its control variate."""

    def aggregate(self, global_state, replies):
        return WeightedMean().aggregate(global_state, replies)

    def instructions(self, server_round, global_state):
        return {
            "mu": 0.01 * server_round,
            "tag": "scaffold",
            "scale": torch.tensor(2.0),
            "c": {k: torch.full_like(v, float(server_round)) for k, v in global_state.items()},
        }


def test_instructions_reach_the_train_messages_and_decode_back(task_identity):
    grid = InProcessGrid(2)
    base = _toy_state()
    strategy = AggregatorStrategy(_Scaffoldish(), min_train_nodes=2, min_available_nodes=2)
    messages = list(strategy.configure_train(3, ArrayRecord(base), ConfigRecord({"lr": 0.1}), grid))
    assert len(messages) == 2
    for m in messages:
        config = m.content["config"]
        assert (config["lr"], config["mu"], config["tag"], config["server-round"]) == (
            0.1, 0.03, "scaffold", 3,
        )  # fmt: skip
        sent = decode_instructions(m.content)
        assert set(sent) == {"scale", "c"}
        assert float(sent["scale"]) == 2.0
        assert set(sent["c"]) == set(base)
        assert torch.equal(sent["c"]["w"], torch.full((3, 4), 3.0))
        assert sent["c"]["steps"].dtype == torch.int64
    assert max_abs_diff(strategy.global_state, base) == 0.0


def test_instructions_that_a_message_cannot_carry_are_refused_by_name():
    with pytest.raises(TypeError, match="'weights'.*dict"):
        encode_instructions({"weights": {"a": 1.0}})
    with pytest.raises(TypeError, match="'nothing'.*NoneType"):
        encode_instructions({"nothing": None})
    with pytest.raises(ValueError, match="without '/'"):
        encode_instructions({"a/b": 1})
    assert encode_instructions({}) == ({}, {})
    assert decode_instructions(RecordDict({"config": ConfigRecord({"x": 1})})) == {}


def test_an_instruction_named_like_a_config_key_is_refused(task_identity):
    class Clash(WeightedMean):
        def instructions(self, server_round, global_state):
            return {"lr": 1.0}

    strategy = AggregatorStrategy(Clash(), min_train_nodes=1, min_available_nodes=1)
    with pytest.raises(ValueError, match=r"\['lr'\].*run config"):
        strategy.configure_train(
            1, ArrayRecord(_toy_state()), ConfigRecord({"lr": 0.1}), InProcessGrid(1)
        )


# ------------------------------------------------------------------------------------ registry


def test_registry_parses_names_and_arguments():
    assert parse_aggregator("weighted-mean") == ("weighted-mean", ())
    assert parse_aggregator("trimmed-mean:0.1") == ("trimmed-mean", (0.1,))
    assert parse_aggregator(" multi-krum:1,3 ") == ("multi-krum", (1, 3))
    assert isinstance(parse_aggregator("krum:1")[1][0], int)
    assert type(make_aggregator("weighted-mean")) is WeightedMean
    assert make_aggregator("trimmed-mean:0.1").config() == {"name": "TrimmedMean", "beta": 0.1}
    assert make_aggregator("krum:1").config() == {"name": "Krum", "num_malicious": 1}
    assert isinstance(make_aggregator("median"), robust.Median)
    mean = WeightedMean()
    assert make_aggregator(mean) is mean
    for name in AGGREGATORS:  # every registered name builds with its defaults
        assert isinstance(make_aggregator(name), Aggregator)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("fedavg", ValueError, "unknown aggregator 'fedavg'.*weighted-mean"),
        ("krum:one", ValueError, "argument 'one' is not a number"),
        ("median:", ValueError, "empty argument list"),
        ("weighted-mean:3", ValueError, "weighted-mean:3"),
        ("trimmed-mean:0.5", ValueError, "beta"),
        (3, TypeError, "string"),
    ],
)
def test_registry_refuses_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        make_aggregator(spec)


def test_register_aggregator_adds_a_name_and_checks_it(monkeypatch):
    monkeypatch.setattr("labsupport.flower.bridge.AGGREGATORS", dict(AGGREGATORS))
    register_aggregator("my-mean", WeightedMean)
    assert type(make_aggregator("my-mean")) is WeightedMean
    with pytest.raises(ValueError, match="lowercase"):
        register_aggregator("My Mean", WeightedMean)
    with pytest.raises(TypeError, match="callable"):
        register_aggregator("x", 3)


def test_app_config_validates_the_aggregator_knob():
    assert task.AppConfig().aggregator == "weighted-mean"
    with pytest.raises(ValueError, match="unknown aggregator 'mean'"):
        task.AppConfig.from_run_config({"aggregator": "mean"})
    with pytest.raises(ValueError, match="aggregator"):
        server_app.make_server_app({"aggregator": "krum:x"})


# --------------------------------------------------------------------- the ServerApp, in process


def test_server_app_with_median_matches_the_simulator_for_two_rounds(task_identity, tmp_path):
    k = 3
    path = tmp_path / "results.json"
    config = task.AppConfig(
        num_server_rounds=2, num_partitions=k, aggregator="median", results_file=str(path)
    )
    out = server_app.run_fedavg(InProcessGrid(k), config)
    sim = FedAvgSimulation(
        task.make_model("mlp", seed=0),
        [DataClient(x, y) for x, y in task.client_partitions(k)],
        test=(task.load_data().x_test, task.load_data().y_test),
        config=FedAvgConfig(num_rounds=2, fraction_train=1.0, batch_size=10, lr=0.05, seed=0),
        aggregator=make_aggregator("median"),
    )
    reference = sim.run(progress=False)
    assert max_abs_diff(out["state_dict"], sim.global_state) < 1e-6
    history = History.from_flower(json.loads(path.read_text())["history"])
    assert history.column("round") == [1, 2]
    assert history.column("clients") == [[0, 1, 2], [0, 1, 2]]
    for ours, theirs in zip(history.rounds, reference.rounds, strict=True):
        assert ours.accuracy == pytest.approx(theirs.accuracy, abs=1e-9)
    assert json.loads(path.read_text())["config"]["aggregator"] == "median"


def test_server_app_records_failed_clients_as_rejections_in_the_history(task_identity):
    config = task.AppConfig(num_server_rounds=1, num_partitions=3)
    out = server_app.run_fedavg(FlakyGrid(3, failing={2}), config)
    history = History.from_flower(out["history"])
    assert history.rounds[0].clients == [0, 1]
    assert history.rounds[0].rejected == {0: "ClientApp raised boom"}


# ----------------------------------------------------------------- one real simulation (Ray)


@pytest.mark.slow
def test_flower_simulation_with_median_equals_the_simulator():
    from labsupport.flower.simulation import run_flower_simulation

    k = 3
    out = run_flower_simulation(k, num_rounds=1, aggregator="median", seed=0)
    assert isinstance(out["history"], History)
    assert out["history"].column("clients") == [[0, 1, 2]]
    sim = _simulator_round(k, 0, "iid", make_aggregator("median"))
    assert max_abs_diff(out["state_dict"], sim.global_state) < 1e-6
    assert out["config"]["aggregator"] == "median"
