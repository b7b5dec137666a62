"""Gradient inversion and membership inference: the attacks work, and DP noise stops inversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.models import build_model
from labsupport.privacy.leakage import (
    example_losses,
    infer_label,
    invert_gradient,
    lira_scores,
    logit_confidence,
    mia_metrics,
    psnr,
    shared_gradient,
)


@pytest.fixture(scope="module")
def digit():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:1] / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(d.target[:1])


def test_gradient_inversion_recovers_a_digit_and_clipping_alone_does_not_stop_it(digit):
    x, y = digit
    model = build_model("mlp", input_shape=(1, 8, 8), seed=0)
    plain = invert_gradient(model, shared_gradient(model, x, y), (1, 8, 8), steps=100)
    clipped = invert_gradient(
        model, shared_gradient(model, x, y, max_grad_norm=0.01), (1, 8, 8), steps=100
    )
    assert plain.label == int(y[0])
    assert psnr(plain.x, x[0]) > 30  # near-exact recovery
    assert psnr(clipped.x, x[0]) > 30  # clipping only rescales the gradient


def test_clip_plus_noise_stops_gradient_inversion(digit):
    x, y = digit
    model = build_model("mlp", input_shape=(1, 8, 8), seed=0)
    g = shared_gradient(
        model,
        x,
        y,
        max_grad_norm=0.1,
        noise_multiplier=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    noisy = invert_gradient(model, g, (1, 8, 8), steps=150)
    assert psnr(noisy.x, x[0]) < 10


def test_infer_label_reads_the_negative_bias_gradient():
    grads = {"w": torch.zeros(3, 2), "b": torch.tensor([0.2, -0.7, 0.5])}
    assert infer_label(grads) == 1
    with pytest.raises(ValueError, match="bias"):
        infer_label({"w": torch.zeros(3, 2)})


def test_noise_without_a_clip_norm_is_refused(digit):
    x, y = digit
    model = build_model("mlp", input_shape=(1, 8, 8), seed=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        shared_gradient(model, x, y, noise_multiplier=1.0)


def test_mia_metrics_match_a_hand_worked_roc():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    members = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    out = mia_metrics(scores, members)
    assert out["auc"] == pytest.approx(8 / 9)  # 8 of 9 member/non-member pairs ordered right
    assert out["tpr_at_0.01_fpr"] == pytest.approx(2 / 3)  # 0.9, 0.8 above the best non-member
    with pytest.raises(ValueError, match="both"):
        mia_metrics(scores, np.ones(6, dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        mia_metrics(np.array([np.nan, 1.0]), np.array([True, False]))


def test_logit_confidence_equals_log_odds_of_the_softmax():
    model = build_model("logistic", seed=0)
    x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    p = torch.softmax(model(x).double(), 1).gather(1, y[:, None]).squeeze(1).detach()
    torch.testing.assert_close(logit_confidence(model, x, y), torch.log(p / (1 - p)))
    loss = example_losses(model, x, y)
    torch.testing.assert_close(loss.double(), -torch.log(p), rtol=1e-5, atol=1e-6)


def test_lira_scores_members_by_the_gaussian_likelihood_ratio():
    gen = torch.Generator().manual_seed(0)
    k, n = 16, 40
    inside = torch.rand(k, n, generator=gen) < 0.5
    conf = torch.where(inside, 3.0, 0.0) + 0.3 * torch.randn(k, n, generator=gen)
    members = torch.arange(n) < n // 2
    target = torch.where(members, 3.0, 0.0) + 0.3 * torch.randn(n, generator=gen)
    scores = lira_scores(target, conf, inside)
    assert mia_metrics(scores.numpy(), members.numpy())["auc"] > 0.99
    # by hand, in numpy: per-example means, one pooled σ per side, the log-likelihood ratio
    c, m, t = conf.double().numpy(), inside.numpy(), target.double().numpy()
    mu_in = np.array([c[m[:, j], j].mean() for j in range(n)])
    mu_out = np.array([c[~m[:, j], j].mean() for j in range(n)])
    sd_in = np.sqrt(((c - mu_in) ** 2)[m].mean())
    sd_out = np.sqrt(((c - mu_out) ** 2)[~m].mean())

    def log_normal(v, mu, sd):
        return -0.5 * ((v - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)

    expected = log_normal(t, mu_in, sd_in) - log_normal(t, mu_out, sd_out)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9)
    assert (scores[members].mean() > scores[~members].mean()).item()
    with pytest.raises(ValueError, match="both IN and OUT"):
        lira_scores(target, conf, torch.ones(k, n, dtype=torch.bool))
