"""Decentralized FL (labsupport.fl.gossip): gossip steps, consensus distance, and the simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.fl.clients import DataClient, FitReply, TrainConfig, local_update
from labsupport.fl.gossip import GossipSimulation, consensus_distance, gossip_average
from labsupport.fl.graphs import fully_connected, mixing_matrix, random_regular, ring, star, torus
from labsupport.fl.selection import client_seed
from labsupport.fl.serialize import payload_nbytes
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.models import build_model

GRAPHS = {
    "ring16": lambda: ring(16),
    "random_regular16_4": lambda: random_regular(16, 4, seed=0),
    "complete16": lambda: fully_connected(16),
    "torus4x4": lambda: torus(4, 4),
    "star16": lambda: star(16),
}


def second_eigenvalue_magnitude(w: np.ndarray) -> float:
    return float(np.sort(np.abs(np.linalg.eigvals(w)))[::-1][1])


def synthetic_clients(
    num_clients: int, per_client: int = 30, seed: int = 0
) -> tuple[list[DataClient], tuple]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 40, generator=g) * 2
    n = num_clients * per_client + 100
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 40, generator=g)
    clients = [
        DataClient(
            x[i * per_client : (i + 1) * per_client], y[i * per_client : (i + 1) * per_client]
        )
        for i in range(num_clients)
    ]
    return clients, (x[-100:], y[-100:])


def random_states(
    n: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(7, 5, generator=g).to(dtype), "b": torch.randn(3, generator=g).to(dtype)}
        for _ in range(n)
    ]


# -------------------------------------------------------------------------------- gossip
@pytest.mark.parametrize(
    "name", ["ring16", "random_regular16_4", "torus4x4", "star16", "complete16"]
)
def test_gossip_preserves_the_average_and_contracts_by_at_most_lambda2_squared(name: str) -> None:
    w = mixing_matrix(GRAPHS[name]())
    lam2 = second_eigenvalue_magnitude(w)
    states = random_states(16, seed=1)
    mean0 = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    for _ in range(5):
        before = consensus_distance(states)
        states = gossip_average(states, w)
        after = consensus_distance(states)
        assert after <= lam2**2 * before * (1 + 1e-10) + 1e-15
        for k, v in mean0.items():
            torch.testing.assert_close(
                torch.stack([s[k] for s in states]).mean(0), v, rtol=0, atol=1e-12
            )


def test_gossip_matches_the_matrix_product_in_numpy() -> None:
    w = mixing_matrix(random_regular(10, 3, seed=2))
    states = random_states(10, seed=4)
    out = gossip_average(states, w)
    x = np.stack([s["w"].numpy().reshape(-1) for s in states])
    np.testing.assert_allclose(
        np.stack([s["w"].numpy().reshape(-1) for s in out]), w @ x, atol=1e-12
    )


def test_gossip_keeps_dtypes_and_rounds_integer_buffers() -> None:
    states = [
        {
            "w": torch.full((2,), float(i), dtype=torch.float32),
            "steps": torch.tensor(i * 3, dtype=torch.int64),
            "h": torch.full((2,), float(i), dtype=torch.float16),
        }
        for i in range(3)
    ]
    out = gossip_average(states, mixing_matrix(fully_connected(3)))
    for s in out:
        assert {k: v.dtype for k, v in s.items()} == {
            "w": torch.float32,
            "steps": torch.int64,
            "h": torch.float16,
        }
        assert int(s["steps"]) == 3  # mean of 0, 3, 6
        torch.testing.assert_close(s["w"], torch.ones(2))


def test_gossip_with_the_identity_changes_nothing_and_inputs_are_not_modified() -> None:
    states = random_states(4, dtype=torch.float32)
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    out = gossip_average(states, np.eye(4))
    for s, c, o in zip(states, copies, out, strict=True):
        for k in s:
            assert torch.equal(s[k], c[k]) and torch.equal(o[k], c[k])


def test_consensus_distance_matches_numpy_and_ignores_integer_entries() -> None:
    states = random_states(5, seed=7)
    for i, s in enumerate(states):
        s["count"] = torch.tensor(i * 100)
    x = np.stack([np.concatenate([s["w"].numpy().ravel(), s["b"].numpy().ravel()]) for s in states])
    expected = ((x - x.mean(0)) ** 2).sum(axis=1).mean()
    assert consensus_distance(states) == pytest.approx(expected, rel=1e-12)
    same = [{k: v.clone() for k, v in states[0].items()} for _ in range(3)]
    assert consensus_distance(same) == 0.0


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: gossip_average(random_states(3), np.eye(4)), ValueError, "4 x 4 but there are 3"),
        (lambda: gossip_average([], np.eye(2)), ValueError, "no states"),
        (
            lambda: gossip_average(random_states(2), np.array([[0.5, 0.5], [0.4, 0.6]])),
            ValueError,
            "symmetric",
        ),
        (
            lambda: consensus_distance([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}]),
            ValueError,
            "keys differ",
        ),
        (
            lambda: consensus_distance([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}]),
            ValueError,
            r"shape \(3,\)",
        ),
    ],
)
def test_invalid_inputs_raise_a_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_simulation_rejects_a_mixing_matrix_of_the_wrong_size_or_too_few_clients() -> None:
    clients, test = synthetic_clients(4)
    model = build_model("logistic", seed=0)
    with pytest.raises(ValueError, match="5 x 5 but there are 4 clients"):
        GossipSimulation(model, clients, test, mixing_matrix(ring(5)))
    with pytest.raises(ValueError, match="at least 2 clients"):
        GossipSimulation(model, clients[:1], test, np.eye(1))
    with pytest.raises(TypeError, match="client 1 is a str"):
        GossipSimulation(model, [clients[0], "x"], test, np.eye(2))
    with pytest.raises(ValueError, match="eval_every"):
        GossipSimulation(model, clients, test, np.eye(4), eval_every=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        GossipSimulation(model, clients, test, np.eye(4), TrainConfig(lr=0.0))
    sim = GossipSimulation(model, clients, None, np.eye(4))
    with pytest.raises(ValueError, match="no test set"):
        sim.evaluate()
    with pytest.raises(ValueError, match=r"client must be in \[0, 3\]"):
        sim.client_model(4)
    with pytest.raises(ValueError, match="num_rounds"):
        sim.run(-1, progress=False)


# ---------------------------------------------------------------------------- simulation
def test_fully_connected_rounds_equal_fedavg_with_all_clients_selected() -> None:
    clients, test = synthetic_clients(5)
    kw = {"local_epochs": 1, "batch_size": 10, "lr": 0.05}
    dec = GossipSimulation(
        build_model("mlp", seed=0),
        clients,
        test,
        mixing_matrix(fully_connected(5)),
        TrainConfig(**kw),
        seed=3,
    )
    fed = FedAvgSimulation(
        build_model("mlp", seed=0), clients, test, FedAvgConfig(fraction_train=1.0, seed=3, **kw)
    )
    for _ in range(2):
        dec.run_round()
        fed.run_round()
        for state in dec.states:
            for k, v in fed.global_state.items():
                torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-7)
        assert dec.history.rounds[-1].extra["consensus_distance"] < 1e-10
        assert dec.history.rounds[-1].accuracy == pytest.approx(fed.history.rounds[-1].accuracy)


def test_a_round_trains_every_client_from_its_own_model_then_gossips() -> None:
    clients, test = synthetic_clients(4)
    w = mixing_matrix(ring(4))
    sim = GossipSimulation(build_model("logistic", seed=0), clients, test, w, seed=1)
    sim.run_round()
    start = [{k: v.clone() for k, v in s.items()} for s in sim.states]
    assert consensus_distance(start) > 0  # a ring does not reach consensus in one step
    sim.run_round()
    # round 2 by hand: local_update from each client's own model, seeded client_seed(1, 2, i), then W
    scratch = build_model("logistic", seed=0)
    trained = [
        local_update(scratch, start[i], c.x, c.y, TrainConfig(), seed=client_seed(1, 2, i))[0]
        for i, c in enumerate(clients)
    ]
    expected = gossip_average(trained, w)
    for got, want in zip(sim.states, expected, strict=True):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    rec = sim.history.rounds[-1]
    assert rec.extra["consensus_distance_before_gossip"] == pytest.approx(
        consensus_distance(trained)
    )
    assert rec.extra["consensus_distance"] <= rec.extra["consensus_distance_before_gossip"]


@pytest.mark.parametrize(
    ("graph", "directed_edges"), [(ring(6), 12), (fully_connected(6), 30), (star(6), 10)]
)
def test_bytes_sent_count_one_state_per_directed_edge(
    graph: np.ndarray, directed_edges: int
) -> None:
    clients, test = synthetic_clients(6)
    model = build_model("logistic", seed=0)
    sim = GossipSimulation(model, clients, test, mixing_matrix(graph))
    record = sim.run_round()
    assert sim.num_directed_edges == directed_edges
    assert record.bytes_up == payload_nbytes(model.state_dict()) * directed_edges
    assert record.bytes_down == 0


def test_identity_mixing_is_local_training_without_communication() -> None:
    clients, test = synthetic_clients(3)
    sim = GossipSimulation(build_model("logistic", seed=0), clients, test, np.eye(3))
    record = sim.run_round()
    assert record.bytes_up == 0
    assert record.extra["consensus_distance"] == pytest.approx(
        record.extra["consensus_distance_before_gossip"]
    )
    assert sim.spectral_gap == 0.0


def test_client_accuracies_are_evaluated_only_when_asked_and_on_schedule() -> None:
    clients, test = synthetic_clients(4)
    w = mixing_matrix(ring(4))
    plain = GossipSimulation(build_model("logistic", seed=0), clients, test, w, eval_every=2)
    plain.run(3, progress=False)
    assert plain.history.column("accuracy")[0] is None  # round 1: off schedule
    assert plain.history.column("accuracy")[1] is not None  # round 2: on schedule
    assert plain.history.column("accuracy")[2] is not None  # round 3: the last round of run()
    assert plain.history.column("client_accuracy_mean") == [None, None, None]

    full = GossipSimulation(build_model("logistic", seed=0), clients, test, w, eval_clients=True)
    rec = full.run_round()
    accs = [m["accuracy"] for m in full.evaluate_clients()]
    assert rec.extra["client_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert rec.extra["client_accuracy_min"] == min(accs)
    assert rec.accuracy == full.evaluate()["accuracy"]


def test_run_continues_to_the_target_round_and_history_has_one_record_per_round() -> None:
    clients, test = synthetic_clients(4)
    sim = GossipSimulation(build_model("logistic", seed=0), clients, test, mixing_matrix(ring(4)))
    sim.run(2, progress=False)
    history = sim.run(3, progress=False)
    assert sim.round == 3 and history.column("round") == [1, 2, 3]
    assert history.cumulative("bytes_up")[-1] == 3 * history.rounds[0].bytes_up
    assert history.final_accuracy is not None and len(history.to_dicts()) == 3


def test_the_average_model_is_the_uniform_average_and_gossip_keeps_it() -> None:
    clients, test = synthetic_clients(4)
    sim = GossipSimulation(build_model("logistic", seed=0), clients, test, mixing_matrix(ring(4)))
    trained, _, _ = sim._local_training()
    sim.states = trained
    before = sim.average_state()
    sim.states = gossip_average(trained, sim.W)
    for k, v in sim.average_state().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            v.numpy(), np.mean([t[k].numpy() for t in trained], axis=0), rtol=1e-5, atol=1e-7
        )


def test_same_seed_gives_the_same_run_and_another_seed_a_different_one() -> None:
    clients, test = synthetic_clients(4)
    w = mixing_matrix(random_regular(4, 2, seed=0))

    def final_states(seed: int) -> list:
        sim = GossipSimulation(build_model("mlp", seed=0), clients, test, w, seed=seed)
        sim.run(2, progress=False)
        return sim.states

    a, b, c = final_states(0), final_states(0), final_states(1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert not all(torch.equal(x[k], y[k]) for x, y in zip(a, c, strict=True) for k in x)
    np.testing.assert_array_equal(random_regular(16, 4, seed=5), random_regular(16, 4, seed=5))
    assert not np.array_equal(random_regular(16, 4, seed=5), random_regular(16, 4, seed=6))


def test_a_failing_client_keeps_its_model_and_the_round_goes_on() -> None:
    clients, test = synthetic_clients(3)

    class Broken(DataClient):
        def fit(self, model, global_state, ctx, config):
            reply = super().fit(model, global_state, ctx, config)
            key = next(iter(reply.state))
            reply.state[key] = torch.full_like(reply.state[key], float("nan"))
            return FitReply(reply.state, reply.num_samples, reply.metrics)

    clients[1] = Broken(clients[1].x, clients[1].y)
    sim = GossipSimulation(
        build_model("logistic", seed=0), clients, test, mixing_matrix(fully_connected(3))
    )
    start = [{k: v.clone() for k, v in s.items()} for s in sim.states]
    record = sim.run_round()
    assert list(record.rejected) == [1] and "non-finite" in record.rejected[1]
    assert all(bool(torch.isfinite(v).all()) for s in sim.states for v in s.values())
    assert consensus_distance(start) == 0.0
