from __future__ import annotations

import logging

import pytest
import torch

from labsupport.fl import (
    DataClient,
    FedAvgConfig,
    FedAvgSimulation,
    aggregate,
    client_seed,
    local_update,
    payload_nbytes,
)
from labsupport.models import build_model


def _clients(num=4, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num * n, 40, generator=g)
    y = (x[:, :10].argmax(1)).long()
    return [DataClient(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(num)], (x, y)


CFG = FedAvgConfig(num_rounds=3, fraction_train=1.0, local_epochs=1, batch_size=5, lr=0.1, seed=0)


class BadClient:
    """A client that sends a given update (or raises) instead of training."""

    def __init__(self, make):
        self.make = make
        self.num_samples = 20

    def fit(self, model, global_state, config, seed):
        return self.make(global_state)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_one_round_is_fedavg_of_the_local_updates():
    clients, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG)
    start = {k: v.clone() for k, v in sim.global_state.items()}
    record = sim.run_round()
    expected_states = [
        local_update(
            build_model("mlp"),
            start,
            c.x,
            c.y,
            epochs=1,
            batch_size=5,
            lr=0.1,
            seed=client_seed(0, 1, i),
        )[0]
        for i, c in enumerate(clients)
    ]
    expected = aggregate(expected_states, [20] * 4)
    assert _same(sim.global_state, expected)
    assert record.clients == [0, 1, 2, 3] and record.rejected == {}
    nbytes = payload_nbytes(start)
    assert record.bytes_up == 4 * nbytes and record.bytes_down == 4 * nbytes
    assert 0.0 <= record.accuracy <= 1.0


BAD_UPDATES = {
    "nan": lambda g: ({k: torch.full_like(v, float("nan")) for k, v in g.items()}, 20, {}),
    "shape": lambda g: ({**g, "fc1.weight": torch.zeros(64, 40)}, 20, {}),
    "dtype": lambda g: ({k: v.double() for k, v in g.items()}, 20, {}),
    "keys": lambda g: ({k: v for k, v in g.items() if k != "fc3.bias"}, 20, {}),
    "weight0": lambda g: (g, 0, {}),
    "weight_negative": lambda g: (g, -3, {}),
    "not_a_dict": lambda g: ("hello", 20, {}),
    "raises": lambda g: (_ for _ in ()).throw(RuntimeError("device lost")),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPDATES))
def test_a_bad_client_is_rejected_logged_and_the_round_goes_on(kind, caplog):
    clients, test = _clients()
    honest = FedAvgSimulation(build_model("mlp", seed=0), clients[:3], test, CFG)
    honest.run_round()
    mixed = FedAvgSimulation(
        build_model("mlp", seed=0), [*clients[:3], BadClient(BAD_UPDATES[kind])], test, CFG
    )
    with caplog.at_level(logging.WARNING, logger="labsupport.fl"):
        record = mixed.run_round()
    assert list(record.rejected) == [3]
    assert "client 3" in record.rejected[3] and "client 3" in caplog.text
    # the global model is FedAvg of the three honest clients, untouched by the bad one
    assert _same(mixed.global_state, honest.global_state)
    assert record.bytes_up == 3 * payload_nbytes(honest.global_state)


def test_a_round_with_no_valid_update_keeps_the_global_model(caplog):
    _, test = _clients(num=2)
    bad = [BadClient(BAD_UPDATES["nan"]), BadClient(BAD_UPDATES["raises"])]
    sim = FedAvgSimulation(build_model("mlp", seed=0), bad, test, CFG)
    before = {k: v.clone() for k, v in sim.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="labsupport.fl"):
        history = sim.run(progress=False)
    assert len(history) == 3 and _same(sim.global_state, before)
    assert "no valid update" in caplog.text
    assert all(len(r.rejected) == 2 for r in history.rounds)


class KilledAt:
    """Wraps a client; at round ``k`` it ends the process as a kill would (SystemExit is not caught)."""

    def __init__(self, client, k):
        self.client, self.k, self.calls = client, k, 0
        self.num_samples = client.num_samples

    def fit(self, model, global_state, config, seed):
        self.calls += 1
        if self.calls == self.k:
            raise SystemExit("killed")
        return self.client.fit(model, global_state, config, seed)


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_final_model(tmp_path):
    clients, test = _clients(num=6)
    cfg = FedAvgConfig(num_rounds=6, fraction_train=0.5, batch_size=5, lr=0.1, seed=3)
    straight = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg)
    straight.run(progress=False)

    ckpt = tmp_path / "ckpt"
    fragile = [KilledAt(c, k=3) if i == 0 else c for i, c in enumerate(clients)]
    first = FedAvgSimulation(build_model("mlp", seed=0), fragile, test, cfg, checkpoint_dir=ckpt)
    with pytest.raises(SystemExit):
        first.run(progress=False)
    killed_at = first.round
    assert 0 < killed_at < 6

    resumed = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg, checkpoint_dir=ckpt)
    assert resumed.round == killed_at
    resumed.run(progress=False)
    assert _same(resumed.global_state, straight.global_state)
    strip = lambda h: [(r.round, r.clients, r.accuracy, r.bytes_up) for r in h.rounds]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)


def test_resuming_with_another_config_is_refused(tmp_path):
    clients, test = _clients()
    FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, checkpoint_dir=tmp_path).run(
        progress=False
    )
    other = FedAvgConfig(num_rounds=3, fraction_train=1.0, batch_size=5, lr=0.2)
    with pytest.raises(ValueError, match="different run.*lr"):
        FedAvgSimulation(build_model("mlp", seed=0), clients, test, other, checkpoint_dir=tmp_path)
    fresh = FedAvgSimulation(
        build_model("mlp", seed=0), clients, test, other, checkpoint_dir=tmp_path, resume=False
    )
    assert fresh.round == 0


def test_history_answers_rounds_to_target_and_bytes():
    clients, test = _clients()
    cfg = FedAvgConfig(num_rounds=4, fraction_train=0.5, batch_size=5, lr=0.1, eval_every=2)
    history = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg).run(progress=False)
    assert history.column("accuracy")[0] is None and history.column("accuracy")[1] is not None
    rounds, accs = history.evaluated()
    assert rounds == [2, 4]
    assert history.rounds_to(0.0) == 2 and history.rounds_to(1.01) is None
    assert history.cumulative_bytes_up()[-1] == sum(r.bytes_up for r in history.rounds)
    assert history.final_accuracy == accs[-1]


def test_fedavg_learns_on_mnist1d(mnist1d):
    idx = torch.randperm(4000, generator=torch.Generator().manual_seed(0)).split(400)
    clients = [DataClient(mnist1d.x_train[i], mnist1d.y_train[i]) for i in idx]
    cfg = FedAvgConfig(num_rounds=8, fraction_train=0.5, local_epochs=2, batch_size=20, lr=0.05)
    sim = FedAvgSimulation(
        build_model("mlp", seed=0), clients, (mnist1d.x_test, mnist1d.y_test), cfg
    )
    first = sim.evaluate()["accuracy"]
    history = sim.run(progress=False)
    assert history.final_accuracy > first + 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction_train": 0.0}, "fraction_train"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"num_rounds": -1}, "num_rounds"),
    ],
)
def test_bad_config_is_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedAvgConfig(**kwargs)


def test_bad_federations_are_explained():
    clients, test = _clients(num=2)
    with pytest.raises(ValueError, match="at least one client"):
        FedAvgSimulation(build_model("mlp"), [], test)
    with pytest.raises(TypeError, match="client 1 is a tuple"):
        FedAvgSimulation(build_model("mlp"), [clients[0], (1, 2)], test)
    with pytest.raises(ValueError, match="min_train_clients=3"):
        FedAvgSimulation(build_model("mlp"), clients, test, FedAvgConfig(min_train_clients=3))
    with pytest.raises(ValueError, match="2 inputs but 3 labels"):
        DataClient(torch.zeros(2, 40), torch.zeros(3, dtype=torch.long))


class WithFlag(torch.nn.Module):
    """An MLP with a boolean buffer: such entries travel as values, not deltas."""

    def __init__(self):
        super().__init__()
        self.net = build_model("mlp", seed=0)
        self.register_buffer("mask", torch.tensor([True, False]))

    def forward(self, x):
        return self.net(x)


def test_compressed_updates_carry_integer_and_bool_buffers():
    from labsupport.fl.compression import make_compressor

    clients, test = _clients()
    sim = FedAvgSimulation(
        WithFlag(), clients, test, CFG, compressor=make_compressor("topk", fraction=0.1)
    )
    record = sim.run_round()
    assert record.rejected == {} and sim.global_state["mask"].tolist() == [True, False]


def test_resuming_with_another_compressor_is_refused(tmp_path):
    from labsupport.fl.compression import make_compressor

    clients, test = _clients()
    first = FedAvgSimulation(
        build_model("mlp", seed=0),
        clients,
        test,
        CFG,
        checkpoint_dir=tmp_path,
        compressor=make_compressor("topk", fraction=0.1),
    )
    first.run_round()
    with pytest.raises(ValueError, match="compressor"):
        FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, checkpoint_dir=tmp_path)


def test_a_broken_compressor_raises_instead_of_rejecting_every_client():
    class Broken:
        def compress(self, delta, client):
            raise RuntimeError("bug in the compressor")

        def decompress(self, payload, like):
            raise AssertionError("unreachable")

    clients, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, compressor=Broken())
    with pytest.raises(RuntimeError, match="bug in the compressor"):
        sim.run_round()


def test_vectorized_mode_refuses_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="plain SGD"):
        FedAvgConfig(vectorized=True, optimizer="adam")


def test_vectorized_mode_falls_back_to_one_by_one_when_a_client_breaks_it(caplog):
    clients, test = _clients()
    odd = DataClient(torch.zeros(20, 39), torch.zeros(20, dtype=torch.long))  # wrong input width
    cfg = FedAvgConfig(num_rounds=1, fraction_train=1.0, batch_size=5, lr=0.1, vectorized=True)
    honest = FedAvgSimulation(
        build_model("mlp", seed=0),
        clients,
        test,
        FedAvgConfig(**{**cfg.__dict__, "vectorized": False}),
    )
    honest.run_round()
    sim = FedAvgSimulation(build_model("mlp", seed=0), [*clients, odd], test, cfg)
    with caplog.at_level(logging.WARNING, logger="labsupport.fl"):
        record = sim.run_round()
    assert "one by one" in caplog.text and list(record.rejected) == [4]
    assert _same(sim.global_state, honest.global_state)


def test_round_train_loss_is_weighted_by_samples():
    class Fixed:
        def __init__(self, n, loss):
            self.num_samples, self.loss = n, loss

        def fit(self, model, global_state, config, seed):
            return (
                {k: v.clone() for k, v in global_state.items()},
                self.num_samples,
                {"loss": self.loss},
            )

    _, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), [Fixed(10, 1.0), Fixed(30, 3.0)], test, CFG)
    assert sim.run_round().train_loss == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)


def test_a_diverging_client_is_rejected_in_vectorized_mode_too(caplog):
    clients, test = _clients()
    huge = DataClient(clients[0].x * 1e30, clients[0].y)  # its gradients overflow to inf/NaN
    cfg = FedAvgConfig(num_rounds=1, fraction_train=1.0, batch_size=5, lr=0.1, vectorized=True)
    sim = FedAvgSimulation(build_model("mlp", seed=0), [*clients[1:], huge], test, cfg)
    with caplog.at_level(logging.WARNING, logger="labsupport.fl"):
        record = sim.run_round()
    assert list(record.rejected) == [3] and "non-finite" in record.rejected[3]
    assert all(bool(torch.isfinite(v).all()) for v in sim.global_state.values())


def test_run_evaluates_the_last_round_it_runs_even_off_schedule():
    clients, test = _clients()
    cfg = FedAvgConfig(num_rounds=10, fraction_train=0.5, batch_size=5, lr=0.1, eval_every=4)
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg)
    history = sim.run(3, progress=False)  # round 3 is neither on the schedule nor the config's last
    assert history.evaluated()[0] == [3]
    assert sim.run_round(evaluate_now=False).accuracy is None
