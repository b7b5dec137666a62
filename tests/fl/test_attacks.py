"""Malicious clients send what they claim to send, and the server runs them like any client."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labsupport.fl.aggregators import WeightedMean
from labsupport.fl.attacks import (
    ATTACKS,
    FreeRiderClient,
    GaussianNoiseClient,
    LabelFlipClient,
    LossLiar,
    SampleCountLiar,
    ScaledUpdateClient,
    SignFlipClient,
    make_attackers,
    malicious_ids,
)
from labsupport.fl.clients import (
    Client,
    DataClient,
    FitReply,
    RoundContext,
    TrainConfig,
    fit_or_reject,
)
from labsupport.fl.robust import InverseLossWeighting, Median
from labsupport.fl.state import clone_state

CFG = TrainConfig(local_epochs=1, batch_size=5, lr=0.1)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    return model, clone_state(model.state_dict()), DataClient(x, y)


def _run(client, model, glob, ctx=None):
    ctx = ctx or RoundContext(1, 0, 5)
    out = fit_or_reject(client, model, glob, ctx, CFG)
    assert isinstance(out, FitReply), out
    return out


def test_every_attack_is_a_client_whose_reply_passes_validation():
    model, glob, honest = _setup()
    for name, make in ATTACKS.items():
        attacker = make(honest) if name != "label_flip" else LabelFlipClient(honest, num_classes=3)
        if name == "scaled_update":
            attacker = ScaledUpdateClient(LabelFlipClient(honest, 3), boost=10.0)
        assert isinstance(attacker, Client), name
        _run(attacker, model, glob)


def test_sign_flip_and_scaled_update_send_the_scaled_honest_delta():
    model, glob, honest = _setup()
    good = _run(honest, model, glob)
    flip = _run(SignFlipClient(honest, scale=3.0), model, glob)
    boost = _run(ScaledUpdateClient(honest, boost=10.0), model, glob)
    for k in glob:
        delta = good.state[k] - glob[k]
        torch.testing.assert_close(flip.state[k] - glob[k], -3.0 * delta, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(boost.state[k] - glob[k], 10.0 * delta, rtol=1e-4, atol=1e-6)


def test_label_flip_trains_on_reversed_labels():
    model, glob, honest = _setup()
    flipped = DataClient(honest.x, 2 - honest.y)
    a = _run(LabelFlipClient(honest, num_classes=3), model, glob)
    b = _run(flipped, model, glob)
    for k in glob:
        assert torch.equal(a.state[k], b.state[k])
    with pytest.raises(ValueError, match="num_classes"):
        LabelFlipClient(honest, num_classes=2)


def test_free_rider_returns_the_global_model_and_noise_client_adds_noise():
    model, glob, _ = _setup()
    free = _run(FreeRiderClient(20), model, glob)
    assert all(torch.equal(free.state[k], glob[k]) for k in glob)
    noisy = _run(GaussianNoiseClient(20, std=2.0), model, glob)
    diff = torch.cat([(noisy.state[k] - glob[k]).reshape(-1) for k in glob])
    assert 1.0 < float(diff.std()) < 3.5


def test_liars_take_over_the_weighted_mean_and_the_inverse_loss_mean():
    model, glob, honest = _setup()
    honest_replies = [_run(honest, model, glob, RoundContext(1, i, i)) for i in range(3)]
    liar = _run(
        SampleCountLiar(SignFlipClient(honest, 1.0), claimed=1e6),
        model,
        glob,
        RoundContext(1, 3, 3),
    )
    assert liar.num_samples == 1e6
    mean = WeightedMean().aggregate(glob, [*honest_replies, liar])
    for k in glob:  # the liar's reversed update is (almost) the new global model
        torch.testing.assert_close(mean[k], liar.state[k], rtol=1e-3, atol=1e-4)
    low = _run(LossLiar(SignFlipClient(honest, 1.0)), model, glob, RoundContext(1, 4, 4))
    assert low.metrics["loss"] == 1e-9
    naive = InverseLossWeighting().aggregate(glob, [*honest_replies, low])
    robust = Median().aggregate(glob, [*honest_replies, low])
    for k in glob:
        torch.testing.assert_close(naive[k], low.state[k], rtol=1e-3, atol=1e-5)
        assert not torch.allclose(robust[k], low.state[k], atol=1e-5)


def test_make_attackers_replaces_the_chosen_fraction():
    _, _, honest = _setup()
    clients = [honest] * 10
    out, bad = make_attackers(clients, "sign_flip", 0.3, seed=1)
    assert len(bad) == 3 and bad == malicious_ids(10, 0.3, seed=1)
    assert all(isinstance(out[i], SignFlipClient) for i in bad)
    assert all(out[i] is honest for i in range(10) if i not in bad)
    with pytest.raises(ValueError, match="unknown attack"):
        make_attackers(clients, "nope", 0.1)
    with pytest.raises(ValueError):
        SignFlipClient(honest, scale=float("nan"))
