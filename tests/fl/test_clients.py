"""Clients (labsupport.fl.clients): TrainConfig, local_update, DataClient and fit_or_reject."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from labsupport.fl.clients import (
    Client,
    DataClient,
    FitReply,
    Rejection,
    RoundContext,
    TrainConfig,
    fit_or_reject,
    local_update,
    num_local_steps,
)
from labsupport.fl.state import aggregate, clone_state
from labsupport.models import build_model


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def _ctx(cid=0, seed=4, **kw):
    return RoundContext(server_round=1, client_id=cid, seed=seed, **kw)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_epochs": 0}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_bad_train_config_is_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "steps"),
    [(40, 10, 2, 8), (41, 10, 1, 5), (7, None, 3, 3), (3, 8, 2, 2)],
)
def test_num_local_steps_is_epochs_times_ceil_n_over_b(n, batch, epochs, steps):
    config = TrainConfig(local_epochs=epochs, batch_size=batch)
    assert num_local_steps(n, config) == steps
    x, y = _data(n)
    _, result = local_update(
        build_model("logistic", seed=0), build_model("logistic").state_dict(), x, y, config
    )
    assert result.steps == steps


# ----------------------------------------------------------------------------- local_update
def test_local_update_trains_from_the_global_state_without_touching_it():
    x, y = _data()
    global_state = build_model("mlp", seed=0).state_dict()
    snapshot = clone_state(global_state)
    scratch = build_model("mlp", seed=99)  # other weights: must be overwritten
    config = TrainConfig(local_epochs=2, batch_size=10, lr=0.1)
    state, result = local_update(scratch, global_state, x, y, config, seed=4)
    assert result.steps == 8 and result.samples == 80
    assert _same(global_state, snapshot)
    again, _ = local_update(build_model("mlp"), global_state, x, y, config, seed=4)
    assert _same(state, again)
    other, _ = local_update(build_model("mlp"), global_state, x, y, config, seed=5)
    assert not _same(state, other)  # the seed orders the batches
    assert not torch.equal(state["fc1.weight"], global_state["fc1.weight"])
    # the returned state is a copy, not the scratch model's live tensors
    with torch.no_grad():
        scratch.fc1.weight.add_(1.0)
    assert _same(state, again)


def test_fedsgd_round_equals_one_full_batch_gradient_step_on_the_union():
    # FedSGD (E=1, B=inf): averaging one full-batch step per client, weighted by n_k, equals one
    # gradient step on all the data -- the identity of McMahan et al. (2017), Section 2.
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 40, generator=g) for n in (10, 30)]
    ys = [torch.randint(0, 10, (len(x),), generator=g) for x in xs]
    global_state = build_model("logistic", seed=0).state_dict()
    config = TrainConfig(batch_size=None, lr=0.3)
    states = [
        local_update(build_model("logistic"), global_state, x, y, config)[0]
        for x, y in zip(xs, ys, strict=True)
    ]
    averaged = aggregate(states, [10, 30])
    central = build_model("logistic")
    local_update(central, global_state, torch.cat(xs), torch.cat(ys), config)
    for k, v in central.state_dict().items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-6)


def test_local_update_passes_hooks_to_train_and_ignores_none():
    x, y = _data()
    calls = []

    def grad_hook(model):
        calls.append(1)

    config = TrainConfig(batch_size=10)
    local_update(
        build_model("logistic"),
        build_model("logistic", seed=0).state_dict(),
        x,
        y,
        config,
        grad_hook=grad_hook,
        penalty=None,
    )
    assert len(calls) == 4


# ----------------------------------------------------------------------------- DataClient
def test_data_client_validates_its_data():
    with pytest.raises(ValueError, match="2 inputs but 3 labels"):
        DataClient(torch.zeros(2, 40), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sample"):
        DataClient(torch.zeros(0, 40), torch.zeros(0, dtype=torch.long))


def test_data_client_is_a_client_and_fit_is_local_update_with_its_seed():
    x, y = _data()
    client = DataClient(x, y)
    assert isinstance(client, Client) and client.num_samples == 40 and client.plain
    global_state = build_model("mlp", seed=0).state_dict()
    config = TrainConfig(batch_size=10, lr=0.1)
    reply = client.fit(build_model("mlp"), global_state, _ctx(cid=3, seed=11), config)
    want, result = local_update(build_model("mlp"), global_state, x, y, config, seed=11)
    assert isinstance(reply, FitReply) and reply.client == 3 and reply.num_samples == 40
    assert _same(reply.state, want)
    assert reply.metrics == {"loss": pytest.approx(result.loss), "steps": 4}


@pytest.mark.parametrize(
    "hook", ["loss_fn", "penalty", "grad_hook", "batch_sampler", "hooks_for_round"]
)
def test_any_hook_makes_a_data_client_not_plain(hook):
    x, y = _data()
    assert not DataClient(x, y, **{hook: lambda *a: None}).plain


def test_a_subclass_overriding_fit_is_not_plain():
    class Mine(DataClient):
        def fit(self, model, global_state, ctx, config):
            return super().fit(model, global_state, ctx, config)

    x, y = _data()
    assert not Mine(x, y).plain


def test_hooks_for_round_reads_the_instructions_of_the_round():
    x, y = _data()
    seen = []

    def hooks_for_round(ctx, global_state):
        mu = ctx.instructions["mu"]
        seen.append((ctx.server_round, ctx.client_id, mu))
        ref = {k: v.clone() for k, v in global_state.items()}

        def penalty(model):
            return mu / 2 * sum(((p - ref[k]) ** 2).sum() for k, p in model.named_parameters())

        return {"penalty": penalty}

    global_state = build_model("logistic", seed=0).state_dict()
    config = TrainConfig(local_epochs=3, batch_size=None, lr=0.5)
    client = DataClient(x, y, hooks_for_round=hooks_for_round)
    ctx = _ctx(cid=2, instructions={"mu": 0.0})
    plain = DataClient(x, y).fit(build_model("logistic"), global_state, ctx, config)
    assert _same(client.fit(build_model("logistic"), global_state, ctx, config).state, plain.state)
    # mu > 0 pulls the model back toward the global one (FedProx's proximal term)
    strong = client.fit(
        build_model("logistic"), global_state, _ctx(cid=2, instructions={"mu": 1.0}), config
    )

    def dist(s):
        return sum(float(((s[k] - global_state[k]) ** 2).sum()) for k in s)

    assert 0 < dist(strong.state) < dist(plain.state)
    assert seen == [(1, 2, 0.0), (1, 2, 1.0)]


def test_a_loss_fn_hook_replaces_cross_entropy():
    x, y = _data()
    global_state = build_model("logistic", seed=0).state_dict()
    config = TrainConfig(batch_size=None, lr=0.5)

    def mse(model, xb, yb):
        return F.mse_loss(model(xb), F.one_hot(yb, 10).float())

    reply = DataClient(x, y, loss_fn=mse).fit(build_model("logistic"), global_state, _ctx(), config)
    ref = build_model("logistic")
    ref.load_state_dict(global_state)
    grads = torch.autograd.grad(mse(ref, x, y), list(ref.parameters()))
    for (k, p), gr in zip(ref.named_parameters(), grads, strict=True):
        torch.testing.assert_close(reply.state[k], p.detach() - 0.5 * gr)


# ----------------------------------------------------------------------------- fit_or_reject
class Replier:
    """A client that replies whatever ``make(global_state)`` returns."""

    def __init__(self, make, num_samples=20):
        self.make = make
        self.num_samples = num_samples

    def fit(self, model, global_state, ctx, config):
        return self.make(global_state)


def test_fit_or_reject_accepts_a_good_reply_with_the_servers_client_id_and_clean_metrics():
    g = build_model("logistic", seed=0).state_dict()
    client = Replier(
        lambda s: FitReply(s, 20, {"loss": 1.5, "flag": True, "name": "x", "n": 3}, client=99)
    )
    reply = fit_or_reject(client, build_model("logistic"), g, _ctx(cid=4), TrainConfig())
    assert isinstance(reply, FitReply) and reply.client == 4  # not the id the client claimed
    assert reply.metrics == {"loss": 1.5, "n": 3.0}
    assert reply.num_samples == 20.0 and _same(reply.state, g)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: (s, 20, {}), "expected a FitReply"),
        (lambda s: None, "expected a FitReply"),
        (lambda s: FitReply({k: v.double() for k, v in s.items()}, 20), "dtype"),
        (lambda s: FitReply(s, 0), "finite number > 0"),
        (lambda s: FitReply(s, float("nan")), "finite number > 0"),
        (lambda s: (_ for _ in ()).throw(RuntimeError("device lost")), "device lost"),
        (lambda s: (_ for _ in ()).throw(KeyError("k")), "KeyError"),
    ],
)
def test_fit_or_reject_turns_a_bad_client_into_a_rejection_and_logs_it(make, reason, caplog):
    g = build_model("logistic", seed=0).state_dict()
    with caplog.at_level(logging.WARNING, logger="labsupport.fl"):
        out = fit_or_reject(Replier(make), build_model("logistic"), g, _ctx(cid=5), TrainConfig())
    assert isinstance(out, Rejection) and out.client == 5 and reason in out.reason
    assert "rejected client 5" in caplog.text


def test_fit_or_reject_lets_a_kill_through():
    g = build_model("logistic", seed=0).state_dict()

    def kill(s):
        raise SystemExit("killed")

    with pytest.raises(SystemExit):
        fit_or_reject(Replier(kill), build_model("logistic"), g, _ctx(), TrainConfig())
