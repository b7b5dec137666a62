"""The DP-SGD exercise's checks pass the solutions and name each plausible mistake."""

from __future__ import annotations

import pytest
import torch

from labsupport.checks import (
    CheckFailed,
    check_clip_and_sum,
    check_dp_gradient,
    check_epsilon_spent,
    check_poisson_batch,
    check_privacy_utility,
)
from labsupport.privacy.accounting import compute_epsilon


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("dpsgd")


def test_solutions_pass_every_dpsgd_check(sol, capsys):
    check_clip_and_sum(sol["clip_and_sum"], seed=0)
    check_dp_gradient(sol["dp_gradient"], seed=0)
    check_poisson_batch(sol["poisson_batch"], seed=0)
    check_epsilon_spent(sol["epsilon_spent"])
    assert capsys.readouterr().out.count("passed") == 4


# ------------------------------------------------------------------ step 1: clipping
def batch_clip(g, c):
    total = g.sum(0)
    return total * min(1.0, c / float(total.norm()))


def normalize_all(g, c):
    return (g / g.norm(dim=1, keepdim=True) * c).sum(0)


def coordinate_clip(g, c):
    return g.clamp(-c, c).sum(0)


def clipped_mean(g, c):
    return (g * (c / g.norm(dim=1, keepdim=True)).clamp(max=1)).mean(0)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (batch_clip, "clipped the batch gradient"),
        (normalize_all, "scaled every row to norm C"),
        (coordinate_clip, "each coordinate"),
        (clipped_mean, "SUM"),
        (lambda g, c: g.sum(0), "nothing was clipped"),
    ],
)
def test_clip_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_clip_and_sum(wrong, seed=1)


def test_clip_check_refuses_nan_on_an_empty_batch():
    def nan_on_empty(g, c):
        if len(g) == 0:
            return torch.full((g.shape[1],), float("nan"), dtype=g.dtype)
        return (g * (c / g.norm(dim=1, keepdim=True)).clamp(max=1)).sum(0)

    with pytest.raises(CheckFailed, match="empty batch"):
        check_clip_and_sum(nan_on_empty, seed=1)


# ------------------------------------------------------------------ step 2: noise
def _clip_sum(g, c):
    if len(g) == 0:
        return torch.zeros(g.shape[1], dtype=g.dtype)
    return (g * (c / g.norm(dim=1, keepdim=True)).clamp(max=1)).sum(0)


def _noise(like, std, gen):
    return torch.normal(0.0, std, size=like.shape, generator=gen, dtype=like.dtype)


def clip_after_noise(g, c, s, b, gen=None):
    noisy = g + _noise(g, s * c, gen)  # noise on every example, then clip
    return _clip_sum(noisy, c) / b


def clip_sum_after_noise(g, c, s, b, gen=None):
    total = _clip_sum(g, c) + _noise(g[0] if len(g) else g.sum(0), s * c, gen)
    return total * min(1.0, c / float(total.norm())) / b


def sigma_not_sigma_c(g, c, s, b, gen=None):
    summed = _clip_sum(g, c)
    return (summed + _noise(summed, s, gen)) / b


def actual_batch_size(g, c, s, b, gen=None):
    summed = _clip_sum(g, c)
    return (summed + _noise(summed, s * c, gen)) / len(g)


def noise_after_mean(g, c, s, b, gen=None):
    summed = _clip_sum(g, c) / b
    return summed + _noise(summed, s * c, gen)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (clip_after_noise, "clipped after adding the noise"),
        (clip_sum_after_noise, "clipped after adding the noise"),
        (sigma_not_sigma_c, "σ·C"),
        (actual_batch_size, "actual batch size"),
        (noise_after_mean, "after dividing"),
        (lambda g, c, s, b, gen=None: _clip_sum(g, c) / b, "no noise"),
    ],
)
def test_dp_gradient_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_dp_gradient(wrong, seed=2)


def test_dp_gradient_check_refuses_the_same_noise_every_step():
    def frozen(g, c, s, b, gen=None):
        summed = _clip_sum(g, c)
        return (summed + _noise(summed, s * c, torch.Generator().manual_seed(0))) / b

    with pytest.raises(CheckFailed, match="same noise"):
        check_dp_gradient(frozen, seed=2)


# ------------------------------------------------------------------ step 3: Poisson sampling
def shuffled_fixed(n, q, gen=None):
    return torch.randperm(n, generator=gen)[: round(q * n)]


def first_examples(n, q, gen=None):
    size = int(torch.binomial(torch.tensor(float(n)), torch.tensor(q), generator=gen))
    return torch.arange(size)


def with_replacement(n, q, gen=None):
    size = int(torch.binomial(torch.tensor(float(n)), torch.tensor(q), generator=gen))
    return torch.randint(0, n, (size,), generator=gen)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (shuffled_fixed, "fixed-size batch"),
        (first_examples, "never drawn"),
        (with_replacement, "twice"),
        (lambda n, q, gen=None: torch.rand(n, generator=gen) < q, "integer tensor"),
    ],
)
def test_poisson_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_poisson_batch(wrong, seed=3)


# ------------------------------------------------------------------ step 4: accountant
def naive(s, q, t, d):
    eps = 0.0
    for _ in range(t):
        eps += s * q
    return eps


def linear(s, q, t, d):
    return compute_epsilon(s, q, 1, d, "opacus_rdp").value * t


def no_delta(s, q, t, d):
    return compute_epsilon(s, q, t, 1e-5, "opacus_rdp").value


@pytest.mark.parametrize(
    ("wrong", "message"),
    [(naive, "naive running sum"), (linear, "linear composition"), (no_delta, "depend on δ")],
)
def test_epsilon_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_epsilon_spent(wrong)


def test_epsilon_check_accepts_the_tighter_prv_accountant():
    check_epsilon_spent(lambda s, q, t, d: compute_epsilon(s, q, t, d, "opacus_prv").value)


# ------------------------------------------------------------------ step 5: the sweep
def _rows(accuracies=(0.8, 0.9, 0.95), sigmas=(2.3, 0.74), spent=None):
    rows = []
    for i, (target, sigma) in enumerate(zip((1.0, 8.0), sigmas, strict=True)):
        eps = compute_epsilon(sigma, 0.05, 100, 1e-5, "opacus_rdp").value
        rows.append(
            {
                "target_epsilon": target,
                "sigma": sigma,
                "sample_rate": 0.05,
                "steps": 100,
                "epsilon": eps if spent is None else spent[i],
                "accuracy": accuracies[i],
            }
        )
    rows.append(
        {
            "target_epsilon": float("inf"),
            "sigma": 0.0,
            "sample_rate": 0.05,
            "steps": 100,
            "epsilon": float("inf"),
            "accuracy": accuracies[2],
        }
    )
    return rows


def test_sweep_check_passes_a_consistent_sweep():
    check_privacy_utility(_rows(), delta=1e-5)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (_rows(spent=(0.2, 1.6)), "does not match"),  # naive ε = σ q T reported
        (_rows(sigmas=(1.0, 0.74)), "spent"),  # σ too small for the target
        (_rows(accuracies=(0.9, 0.9, 0.5)), "fresh model"),
        (_rows()[:2], "non-private"),
    ],
)
def test_sweep_check_names_the_mistake(rows, message):
    with pytest.raises(CheckFailed, match=message):
        check_privacy_utility(rows, delta=1e-5)
