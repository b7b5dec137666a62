"""FedProx's proximal term and stragglers' partial work, checked by hand-worked computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl.clients import DataClient, RoundContext, TrainConfig
from labsupport.fl.fedprox import (
    MU_KEY,
    StragglerClient,
    fedprox_hooks,
    limited_batches,
    proximal_penalty,
)
from labsupport.fl.state import clone_state
from labsupport.models import MLP
from labsupport.train import train


class NeedsArgs(nn.Module):
    """A model whose constructor needs arguments: ``type(model)()`` fails for it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_proximal_penalty_and_its_gradient_equal_the_hand_computation():
    model = NeedsArgs(5)
    glob = clone_state(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mu = 0.3
    pen = proximal_penalty(glob, mu)(model)
    want = (
        0.5
        * mu
        * sum(
            float(((p.detach().numpy() - glob[n].numpy()) ** 2).sum())
            for n, p in model.named_parameters()
        )
    )
    assert float(pen.detach()) == pytest.approx(want, rel=1e-6)
    pen.backward()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), mu * (p.detach() - glob[n]).numpy(), rtol=1e-5)


def test_penalty_holds_detached_anchors_that_later_changes_do_not_reach():
    model = NeedsArgs(3)
    glob = clone_state(model.state_dict())
    penalty = proximal_penalty(glob, 1.0)
    for v in glob.values():
        v.add_(100.0)  # the caller changes its dict afterwards
    assert float(penalty(model).detach()) == 0.0


def test_hooks_read_mu_from_the_instructions_and_refuse_a_missing_mu():
    glob = clone_state(NeedsArgs(3).state_dict())
    hooks = fedprox_hooks()
    ctx = RoundContext(1, 0, 0, instructions={MU_KEY: 0.5})
    assert "penalty" in hooks(ctx, glob)
    assert hooks(RoundContext(1, 0, 0, instructions={MU_KEY: 0.0}), glob) == {}
    with pytest.raises(KeyError, match=MU_KEY):
        hooks(RoundContext(1, 0, 0), glob)
    with pytest.raises(ValueError, match="mu"):
        fedprox_hooks(-1.0)
    with pytest.raises(ValueError, match="mu"):
        hooks(RoundContext(1, 0, 0, instructions={MU_KEY: float("nan")}), glob)


@pytest.mark.parametrize("model_fn", [lambda: NeedsArgs(6), lambda: MLP(4, 3, hidden=8)])
def test_larger_mu_keeps_the_local_model_closer_to_the_global_one(model_fn):
    x, y = _data()
    model = model_fn()
    glob = clone_state(model.state_dict())
    cfg = TrainConfig(local_epochs=3, batch_size=8, lr=0.2)
    dist = []
    for mu in (0.0, 0.5, 3.0):
        client = DataClient(x, y, hooks_for_round=fedprox_hooks(mu))
        reply = client.fit(model, clone_state(glob), RoundContext(1, 0, 7), cfg)
        dist.append(sum(float((reply.state[k] - glob[k]).norm() ** 2) for k in glob) ** 0.5)
    assert dist[0] > dist[1] > dist[2]


def test_mu_zero_trains_exactly_like_fedavg():
    x, y = _data()
    model = MLP(4, 3, hidden=8)
    glob = clone_state(model.state_dict())
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.1)
    a = DataClient(x, y, hooks_for_round=fedprox_hooks(0.0)).fit(
        model, clone_state(glob), RoundContext(1, 0, 3), cfg
    )
    b = DataClient(x, y).fit(model, clone_state(glob), RoundContext(1, 0, 3), cfg)
    for k in glob:
        assert torch.equal(a.state[k], b.state[k])


def test_limited_batches_stop_after_the_budget_across_epochs():
    sampler = limited_batches(4, 5)
    gen = torch.Generator().manual_seed(0)
    first = list(sampler(10, gen))  # 3 batches of an epoch
    second = list(sampler(10, gen))  # 2 more, then the budget is spent
    third = list(sampler(10, gen))
    assert [len(first), len(second), len(third)] == [3, 2, 0]
    with pytest.raises(ValueError):
        limited_batches(4, -1)


def test_straggler_returns_partial_work_equal_to_k_plain_steps():
    x, y = _data(50)
    model = MLP(4, 3, hidden=8)
    glob = clone_state(model.state_dict())
    cfg = TrainConfig(local_epochs=5, batch_size=10, lr=0.1)
    ctx = RoundContext(2, 1, 11)
    reply = StragglerClient(DataClient(x, y), max_steps=3).fit(model, clone_state(glob), ctx, cfg)
    assert reply.metrics["steps"] == 3 and reply.num_samples == 50
    ref = MLP(4, 3, hidden=8)
    ref.load_state_dict(glob)
    train(ref, x, y, steps=3, batch_size=10, lr=0.1, generator=torch.Generator().manual_seed(11))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(reply.state[k], v)
    full = DataClient(x, y).fit(model, clone_state(glob), ctx, cfg)
    assert full.metrics["steps"] == 25
    budget = StragglerClient(DataClient(x, y), max_steps=lambda c: c.server_round)
    assert budget.fit(model, clone_state(glob), ctx, cfg).metrics["steps"] == 2


def test_gradient_form_trains_the_same_model_as_the_loss_form():
    x, y = _data()
    model = NeedsArgs(5)
    glob = clone_state(model.state_dict())
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1)
    ctx = RoundContext(1, 0, 4)
    a = DataClient(x, y, hooks_for_round=fedprox_hooks(0.5)).fit(model, clone_state(glob), ctx, cfg)
    b = DataClient(x, y, hooks_for_round=fedprox_hooks(0.5, form="gradient")).fit(
        model, clone_state(glob), ctx, cfg
    )
    for k in glob:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="form"):
        fedprox_hooks(0.1, form="nope")
