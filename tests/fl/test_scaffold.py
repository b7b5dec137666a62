"""SCAFFOLD: option II, the gradient correction and the server's control variate, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl.clients import DataClient, FitReply, RoundContext, TrainConfig
from labsupport.fl.scaffold import C_KEY, Scaffold, ScaffoldClient, control_variate_update
from labsupport.fl.state import clone_state


def _linear():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _data(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_control_variate_update_is_option_two():
    rng = np.random.default_rng(0)
    c_i, c, x, y = ({"w": torch.from_numpy(rng.normal(size=4))} for _ in range(4))
    got = control_variate_update(c_i, c, x, y, steps=5, lr=0.1)["w"].numpy()
    want = c_i["w"].numpy() - c["w"].numpy() + (x["w"].numpy() - y["w"].numpy()) / 0.5
    np.testing.assert_allclose(got, want)
    with pytest.raises(ValueError):
        control_variate_update(c_i, c, x, y, steps=0, lr=0.1)


def test_client_step_uses_the_corrected_gradient_and_updates_its_control_variate():
    model = _linear()
    glob = clone_state(model.state_dict())
    x, y = _data()
    c = {k: torch.full_like(v, 0.3, dtype=torch.float64) for k, v in glob.items()}
    client = ScaffoldClient(DataClient(x, y))
    client.c_i = {k: torch.full_like(v, 0.1, dtype=torch.float64) for k, v in glob.items()}
    cfg = TrainConfig(local_epochs=1, batch_size=None, lr=0.5)  # one full-batch step
    reply = client.fit(
        model, clone_state(glob), RoundContext(1, 0, 0, instructions={C_KEY: c}), cfg
    )
    ref = _linear()
    ref.load_state_dict(glob)
    loss = nn.functional.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (name, p), g in zip(ref.named_parameters(), grads, strict=True):
        want = p.detach() - 0.5 * (g + 0.3 - 0.1)
        torch.testing.assert_close(reply.state[name], want)
        # option II with K = 1: c_i+ = c_i - c + (x - y) / lr = 0.1 - 0.3 + (g + 0.2) = g
        torch.testing.assert_close(client.c_i[name].float(), g, atol=1e-5, rtol=1e-5)


def test_client_refuses_adam_and_a_missing_control_variate():
    model = _linear()
    glob = clone_state(model.state_dict())
    client = ScaffoldClient(DataClient(*_data()))
    with pytest.raises(ValueError, match="SGD"):
        client.fit(
            model,
            glob,
            RoundContext(1, 0, 0, instructions={C_KEY: {}}),
            TrainConfig(optimizer="adam"),
        )
    with pytest.raises(KeyError, match=C_KEY):
        client.fit(model, glob, RoundContext(1, 0, 0), TrainConfig())


def test_server_updates_model_and_control_variate_as_the_paper_says():
    glob = {"w": torch.zeros(2), "n": torch.tensor(4)}
    agg = Scaffold(num_clients=10, local_lr=0.1, global_lr=0.5)
    c0 = agg.instructions(1, glob)[C_KEY]
    assert torch.equal(c0["w"], torch.zeros(2, dtype=torch.float64)) and "n" not in c0
    ys = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])]
    replies = [
        FitReply({"w": ys[0], "n": torch.tensor(5)}, 1.0, {"steps": 2.0}, 0),
        FitReply({"w": ys[1], "n": torch.tensor(7)}, 3.0, {"steps": 4.0}, 1),
    ]
    new = agg.aggregate(glob, replies)
    mean = (1 * ys[0] + 3 * ys[1]) / 4
    torch.testing.assert_close(new["w"], 0.5 * mean)
    assert new["n"].item() == 6  # (5 + 3 * 7) / 4 = 6.5 -> 6 (half to even)
    dc = [-(ys[0].double()) / (2 * 0.1), -(ys[1].double()) / (4 * 0.1)]  # (x - y)/(K lr) - 0
    torch.testing.assert_close(agg.c["w"], (2 / 10) * (dc[0] + dc[1]) / 2)
    other = Scaffold(10, 0.1, 0.5)
    other.load_state_dict(agg.state_dict())
    torch.testing.assert_close(other.c["w"], agg.c["w"])
    assert all(isinstance(v, torch.Tensor) for v in agg.state_dict().values())


def test_scaffold_clients_keep_their_control_variates_and_save_them():
    model = _linear()
    glob = clone_state(model.state_dict())
    agg = Scaffold(num_clients=2, local_lr=0.1)
    clients = [ScaffoldClient(DataClient(*_data(s))) for s in (1, 2)]
    cfg = TrainConfig(local_epochs=1, batch_size=4, lr=0.1)
    for rnd in (1, 2):
        ins = agg.instructions(rnd, glob)
        replies = [
            cl.fit(
                model, clone_state(glob), RoundContext(rnd, i, rnd * 10 + i, instructions=ins), cfg
            )
            for i, cl in enumerate(clients)
        ]
        glob = agg.aggregate(glob, replies)
    # with all clients participating, c equals the mean of the c_i (the paper's invariant)
    mean_ci = {k: (clients[0].c_i[k] + clients[1].c_i[k]) / 2 for k in agg.c}
    for k in agg.c:
        torch.testing.assert_close(agg.c[k], mean_ci[k])
    saved = clients[0].state_dict()
    fresh = ScaffoldClient(clients[0].client)
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.c_i[k], clients[0].c_i[k]) for k in saved)


def test_scaffold_runs_in_the_server_and_resumes_from_a_checkpoint(tmp_path):
    from labsupport.fl.server import FedAvgConfig, FedAvgSimulation

    def make(dirname):
        clients = [ScaffoldClient(DataClient(*_data(s, n=20))) for s in range(3)]
        cfg = FedAvgConfig(num_rounds=3, fraction_train=1.0, batch_size=5, lr=0.1)
        agg = Scaffold(num_clients=3, local_lr=0.1)
        sim = FedAvgSimulation(_linear(), clients, _data(9, n=30), cfg, aggregator=agg,
                               checkpoint_dir=tmp_path / dirname)  # fmt: skip
        return sim, agg

    sim, agg = make("a")
    sim.run(progress=False)
    assert all(not r.rejected for r in sim.history.rounds)
    assert any(float(v.abs().sum()) > 0 for v in agg.c.values())
    resumed, agg2 = make("a")  # a new server over the same checkpoint picks up c
    assert resumed.round == 3
    for k in agg.c:
        torch.testing.assert_close(agg2.c[k], agg.c[k])
