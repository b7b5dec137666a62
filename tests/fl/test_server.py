"""The in-process FedAvg server (labsupport.fl.server): rounds, rejection, history, resume."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from labsupport.fl.aggregators import Aggregator, WeightedMean
from labsupport.fl.clients import DataClient, FitReply, TrainConfig, local_update
from labsupport.fl.selection import client_seed
from labsupport.fl.serialize import payload_nbytes
from labsupport.fl.server import CHECKPOINT_NAME, FedAvgConfig, FedAvgSimulation
from labsupport.fl.state import aggregate, clone_state
from labsupport.fl.transforms import UpdateTransform
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

    def fit(self, model, global_state, ctx, config):
        state, n, metrics = self.make(global_state)
        return FitReply(state, n, metrics, ctx.client_id)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_round_is_fedavg_of_the_local_updates():
    clients, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG)
    start = clone_state(sim.global_state)
    record = sim.run_round()
    config = CFG.train_config()
    expected_states = [
        local_update(build_model("mlp"), start, c.x, c.y, config, seed=client_seed(0, 1, i))[0]
        for i, c in enumerate(clients)
    ]
    expected = aggregate(expected_states, [20] * 4)
    assert _same(sim.global_state, expected)
    assert record.round == 1 and record.clients == [0, 1, 2, 3] and record.rejected == {}
    nbytes = payload_nbytes(start)
    assert record.bytes_up == 4 * nbytes and record.bytes_down == 4 * nbytes
    assert 0.0 <= record.accuracy <= 1.0
    assert record.seconds >= record.eval_seconds >= 0


def test_the_global_model_object_is_never_trained_in():
    clients, test = _clients()
    model = build_model("mlp", seed=0)
    sim = FedAvgSimulation(model, clients, test, CFG)
    before = clone_state(model.state_dict())
    sim.run_round(evaluate_now=False)
    assert _same(model.state_dict(), before)
    assert _same(sim.global_model().state_dict(), sim.global_state)


def test_train_config_carries_only_the_client_side_knobs():
    cfg = FedAvgConfig(local_epochs=3, batch_size=None, lr=0.2, optimizer="adam", momentum=0.0)
    assert cfg.train_config() == TrainConfig(
        local_epochs=3, batch_size=None, lr=0.2, optimizer="adam", momentum=0.0
    )


BAD_UPDATES = {
    "nan": lambda g: ({k: torch.full_like(v, float("nan")) for k, v in g.items()}, 20, {}),
    "inf": lambda g: ({k: torch.full_like(v, float("inf")) for k, v in g.items()}, 20, {}),
    "shape": lambda g: ({**g, "fc1.weight": torch.zeros(64, 40)}, 20, {}),
    "dtype": lambda g: ({k: v.double() for k, v in g.items()}, 20, {}),
    "keys": lambda g: ({k: v for k, v in g.items() if k != "fc3.bias"}, 20, {}),
    "extra_key": lambda g: ({**g, "evil": torch.zeros(1)}, 20, {}),
    "weight0": lambda g: (g, 0, {}),
    "weight_negative": lambda g: (g, -3, {}),
    "weight_nan": lambda g: (g, float("nan"), {}),
    "weight_str": lambda g: (g, "20", {}),
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
    assert list(record.rejected) == [3] and record.rejected[3]
    assert "client 3" in caplog.text
    # the global model is FedAvg of the three honest clients, untouched by the bad one
    assert _same(mixed.global_state, honest.global_state)
    assert record.bytes_up == 3 * payload_nbytes(honest.global_state)


def test_a_round_with_no_valid_update_keeps_the_global_model(caplog):
    _, test = _clients(num=2)
    bad = [BadClient(BAD_UPDATES["nan"]), BadClient(BAD_UPDATES["raises"])]
    sim = FedAvgSimulation(build_model("mlp", seed=0), bad, test, CFG)
    before = clone_state(sim.global_state)
    with caplog.at_level(logging.WARNING, logger="labsupport.fl"):
        history = sim.run(progress=False)
    assert len(history) == 3 and _same(sim.global_state, before)
    assert "no valid update" in caplog.text
    assert all(len(r.rejected) == 2 and r.train_loss is None for r in history.rounds)


class KilledAt:
    """Wraps a client; at its ``k``-th call it ends the process as a kill would (not caught)."""

    def __init__(self, client, k):
        self.client, self.k, self.calls = client, k, 0
        self.num_samples = client.num_samples

    def fit(self, model, global_state, ctx, config):
        self.calls += 1
        if self.calls == self.k:
            raise SystemExit("killed")
        return self.client.fit(model, global_state, ctx, config)


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
    assert 0 < killed_at < 6 and (ckpt / CHECKPOINT_NAME).exists()

    resumed = FedAvgSimulation(build_model("mlp", seed=0), clients, test, cfg, checkpoint_dir=ckpt)
    assert resumed.round == killed_at
    resumed.run(progress=False)
    assert _same(resumed.global_state, straight.global_state)

    def strip(h):
        return [(r.round, r.clients, r.accuracy, r.bytes_up, r.train_loss) for r in h.rounds]

    assert strip(resumed.history) == strip(straight.history)


def test_resuming_with_another_config_is_refused(tmp_path):
    clients, test = _clients()
    FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, checkpoint_dir=tmp_path).run(
        progress=False
    )
    other = dataclasses.replace(CFG, lr=0.2)
    with pytest.raises(ValueError, match="different run.*lr"):
        FedAvgSimulation(build_model("mlp", seed=0), clients, test, other, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="num_clients"):
        FedAvgSimulation(
            build_model("mlp", seed=0), clients[:3], test, CFG, checkpoint_dir=tmp_path
        )
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
    assert history.cumulative("bytes_up")[-1] == sum(r.bytes_up for r in history.rounds)
    assert history.final_accuracy == accs[-1]
    assert all(len(r.clients) == 2 for r in history.rounds)


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
        ({"fraction_train": 1.5}, "fraction_train"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"num_rounds": -1}, "num_rounds"),
        ({"eval_every": 0}, "eval_every"),
        ({"optimizer": "rmsprop"}, "optimizer"),
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
    with pytest.raises(TypeError, match="expected an Aggregator"):
        FedAvgSimulation(build_model("mlp"), clients, test, aggregator=lambda g, r: g)
    with pytest.raises(TypeError, match="expected an UpdateTransform"):
        FedAvgSimulation(build_model("mlp"), clients, test, transforms=[object()])
    sim = FedAvgSimulation(build_model("mlp"), clients, None)
    with pytest.raises(ValueError, match="no test set"):
        sim.evaluate()
    assert sim.run_round().accuracy is None


class WithFlag(torch.nn.Module):
    """An MLP with a boolean and an integer buffer: such entries travel as values, not deltas."""

    def __init__(self):
        super().__init__()
        self.net = build_model("mlp", seed=0)
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("count", torch.tensor([7, -3], dtype=torch.int64))

    def forward(self, x):
        return self.net(x)


def test_compressed_updates_carry_integer_and_bool_buffers():
    from labsupport.fl.compression import make_compressor

    clients, test = _clients()
    sim = FedAvgSimulation(
        WithFlag(), clients, test, CFG, transforms=[make_compressor("topk", fraction=0.1)]
    )
    record = sim.run_round()
    assert record.rejected == {} and sim.global_state["mask"].tolist() == [True, False]
    assert sim.global_state["count"].tolist() == [7, -3]


def test_resuming_with_another_transform_pipeline_is_refused(tmp_path):
    from labsupport.fl.compression import make_compressor

    clients, test = _clients()
    first = FedAvgSimulation(
        build_model("mlp", seed=0),
        clients,
        test,
        CFG,
        checkpoint_dir=tmp_path,
        transforms=[make_compressor("topk", fraction=0.1)],
    )
    first.run_round()
    with pytest.raises(ValueError, match="transforms"):
        FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, checkpoint_dir=tmp_path)


def test_a_broken_transform_raises_instead_of_rejecting_every_client():
    class Broken(UpdateTransform):
        def encode(self, delta, ctx):
            raise RuntimeError("bug in the transform")

    clients, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, transforms=[Broken()])
    with pytest.raises(RuntimeError, match="bug in the transform"):
        sim.run_round()


def test_a_broken_aggregator_raises_instead_of_producing_a_bad_model():
    class Nan(Aggregator):
        def aggregate(self, global_state, replies):
            return {k: torch.full_like(v, float("nan")) for k, v in global_state.items()}

    clients, test = _clients()
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, CFG, aggregator=Nan())
    before = clone_state(sim.global_state)
    with pytest.raises(ValueError, match="non-finite"):
        sim.run_round()
    assert _same(sim.global_state, before)


def test_aggregator_instructions_reach_every_client_of_the_round():
    seen = []

    class Instructing(WeightedMean):
        def instructions(self, server_round, global_state):
            return {"round_twice": 2 * server_round}

    class Spy:
        num_samples = 20

        def fit(self, model, global_state, ctx, config):
            seen.append((ctx.server_round, ctx.client_id, dict(ctx.instructions), ctx.cohort))
            return FitReply(global_state, 20)

    _, test = _clients()
    sim = FedAvgSimulation(
        build_model("logistic", seed=0), [Spy(), Spy()], test, CFG, aggregator=Instructing()
    )
    sim.run(2, progress=False)
    assert seen == [
        (1, 0, {"round_twice": 2}, (0, 1)),
        (1, 1, {"round_twice": 2}, (0, 1)),
        (2, 0, {"round_twice": 4}, (0, 1)),
        (2, 1, {"round_twice": 4}, (0, 1)),
    ]


def test_each_client_gets_its_derived_seed_and_the_client_side_config():
    seen = []

    class Spy:
        num_samples = 20

        def fit(self, model, global_state, ctx, config):
            seen.append((ctx.client_id, ctx.seed, config))
            return FitReply(global_state, 20)

    _, test = _clients()
    cfg = dataclasses.replace(CFG, seed=9)
    FedAvgSimulation(build_model("logistic", seed=0), [Spy(), Spy()], test, cfg).run_round()
    assert seen == [(c, client_seed(9, 1, c), cfg.train_config()) for c in (0, 1)]


def test_vectorized_mode_refuses_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="plain SGD"):
        FedAvgConfig(vectorized=True, optimizer="adam")
    with pytest.raises(ValueError, match="plain SGD"):
        FedAvgConfig(vectorized=True, momentum=0.9)


def test_vectorized_mode_falls_back_to_one_by_one_when_a_client_breaks_it(caplog):
    clients, test = _clients()
    odd = DataClient(torch.zeros(20, 39), torch.zeros(20, dtype=torch.long))  # wrong input width
    cfg = FedAvgConfig(num_rounds=1, fraction_train=1.0, batch_size=5, lr=0.1, vectorized=True)
    honest = FedAvgSimulation(
        build_model("mlp", seed=0), clients, test, dataclasses.replace(cfg, vectorized=False)
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

        def fit(self, model, global_state, ctx, config):
            return FitReply(clone_state(global_state), self.num_samples, {"loss": self.loss})

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
    assert sim.run_round(evaluate_now=True).accuracy is not None


def test_a_selector_decides_who_trains_and_a_bad_one_is_refused_with_its_output():
    def always_first_two(num_clients, fraction, *, min_clients, seed, server_round):
        return [1, 0]

    cfg = FedAvgConfig(num_rounds=2, fraction_train=0.5, batch_size=5)
    clients, _ = _clients()
    sim = FedAvgSimulation(
        build_model("mlp", seed=0), clients, None, cfg, selector=always_first_two
    )
    sim.run(progress=False)
    assert sim.history.column("clients") == [[0, 1], [0, 1]]

    def repeats(num_clients, fraction, **kw):
        return [2, 2]

    bad = FedAvgSimulation(build_model("mlp", seed=0), clients, None, cfg, selector=repeats)
    with pytest.raises(ValueError, match=r"returned \[2, 2\] in round 1; expected distinct"):
        bad.run_round()
