"""The training loop (labsupport.train): steps, batches, hooks, Poisson sampling, devices."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from labsupport.models import build_model
from labsupport.train import batch_indices, evaluate, fit, poisson_batches, train


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    y = (x[:, 0] > 0).long()  # linearly separable
    return x, y


def test_batch_indices_cover_every_sample_once_per_epoch():
    idx = torch.cat(list(batch_indices(103, 10, torch.Generator().manual_seed(0))))
    assert sorted(idx.tolist()) == list(range(103))
    assert [len(b) for b in batch_indices(103, 10)][-1] == 3
    assert [b.tolist() for b in batch_indices(5, None)] == [[0, 1, 2, 3, 4]]


def test_training_is_deterministic_by_generator():
    x, y = _toy()
    states = []
    for _ in range(2):
        model = build_model("mlp", seed=0)
        train(
            model, x, y, epochs=2, batch_size=8, lr=0.1, generator=torch.Generator().manual_seed(5)
        )
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_full_batch_step_is_one_gradient_descent_step():
    x, y = _toy()
    model = build_model("logistic", seed=0)
    ref = build_model("logistic", seed=0)
    result = train(model, x, y, epochs=1, batch_size=None, lr=0.5)
    assert result.steps == 1 and result.samples == 64
    loss = torch.nn.functional.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, p0, g in zip(model.parameters(), ref.parameters(), grads, strict=True):
        torch.testing.assert_close(p, p0 - 0.5 * g)
    assert result.loss == pytest.approx(loss.item())


def test_steps_budget_crosses_epochs():
    x, y = _toy(n=30)
    result = train(build_model("logistic"), x, y, steps=7, batch_size=10)
    assert result.steps == 7 and result.samples == 70


def test_evaluate_matches_a_hand_count():
    x, y = _toy(n=50)
    model = build_model("logistic", seed=1)
    metrics = evaluate(model, x, y, batch_size=16)
    with torch.no_grad():
        logits = model(x)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert metrics["loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5
    )


def test_fit_learns_a_separable_problem_and_records_history():
    x, y = _toy(n=200)
    hist = fit(
        build_model("logistic", seed=0), x, y, x, y, steps=150, eval_every=50, progress=False
    )
    assert hist["step"] == [50, 100, 150]
    assert hist["test_accuracy"][-1] > 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"epochs": 1, "steps": 1}, "exactly one of"),
        ({"epochs": 1, "batch_size": 0}, "batch_size"),
        ({"epochs": 1, "optimizer": "lbfgs"}, "unknown optimizer"),
    ],
)
def test_bad_training_arguments_are_explained(kwargs, message):
    x, y = _toy()
    with pytest.raises(ValueError, match=message):
        train(build_model("logistic"), x, y, **kwargs)


def test_empty_or_mismatched_data_is_rejected():
    x, y = _toy()
    with pytest.raises(ValueError, match="samples"):
        train(build_model("logistic"), x, y[:3], epochs=1)
    with pytest.raises(ValueError, match="empty"):
        evaluate(build_model("logistic"), x[:0], y[:0])


# ------------------------------------------------------------------------------ hooks
def test_loss_fn_replaces_cross_entropy_checked_against_a_hand_computed_step():
    x, y = _toy(n=16)
    model = build_model("logistic", seed=0)
    ref = build_model("logistic", seed=0)

    def squared_error(m, xb, yb):
        return ((m(xb) - torch.nn.functional.one_hot(yb, 10).float()) ** 2).sum(1).mean()

    result = train(model, x, y, epochs=1, batch_size=None, lr=0.1, loss_fn=squared_error)
    # by hand: logits z = x W^T + b, L = mean_i ||z_i - e_{y_i}||^2, dL/dz = 2 (z - e_y) / n
    w, b = ref[1].weight.detach().double(), ref[1].bias.detach().double()
    xd = x.double()
    z = xd @ w.T + b
    dz = 2 * (z - torch.nn.functional.one_hot(y, 10).double()) / len(x)
    torch.testing.assert_close(
        model[1].weight.detach().double(), w - 0.1 * dz.T @ xd, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        model[1].bias.detach().double(), b - 0.1 * dz.sum(0), rtol=1e-5, atol=1e-6
    )
    loss = float(((z - torch.nn.functional.one_hot(y, 10).double()) ** 2).sum(1).mean())
    assert result.loss == pytest.approx(loss, rel=1e-5)


def test_a_grad_hook_that_zeroes_the_gradients_leaves_the_weights_unchanged():
    x, y = _toy()
    model = build_model("mlp", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def zero(m):
        calls.append(1)
        for p in m.parameters():
            p.grad.zero_()

    result = train(model, x, y, epochs=2, batch_size=16, lr=0.5, grad_hook=zero)
    assert len(calls) == result.steps == 8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_grad_hook_can_rewrite_gradients():
    x, y = _toy()
    halved, full = build_model("logistic", seed=0), build_model("logistic", seed=0)

    def halve(m):
        for p in m.parameters():
            p.grad.mul_(0.5)

    train(halved, x, y, epochs=1, batch_size=None, lr=0.2, grad_hook=halve)
    train(full, x, y, epochs=1, batch_size=None, lr=0.1)
    for a, b in zip(halved.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_penalty_is_added_to_the_loss():
    x, y = _toy()
    model, ref = build_model("logistic", seed=0), build_model("logistic", seed=0)
    result = train(
        model,
        x,
        y,
        epochs=1,
        batch_size=None,
        lr=0.1,
        penalty=lambda m: 0.5 * (m[1].weight ** 2).sum(),
    )
    loss = torch.nn.functional.cross_entropy(ref(x), y) + 0.5 * (ref[1].weight ** 2).sum()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, p0, g in zip(model.parameters(), ref.parameters(), grads, strict=True):
        torch.testing.assert_close(p, p0 - 0.1 * g)
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-6)


def test_poisson_batches_include_each_example_independently_with_probability_q():
    n, q = 2000, 0.05
    gen = torch.Generator().manual_seed(0)
    batches = [b for _ in range(10) for b in poisson_batches(n, sample_rate=q, generator=gen)]
    assert len(batches) == 10 * round(1 / q)
    member = torch.zeros(len(batches), n)
    for i, b in enumerate(batches):
        assert b.dtype == torch.int64 and b.dim() == 1
        assert bool((b[1:] > b[:-1]).all()) and (
            len(b) == 0 or 0 <= int(b.min()) <= int(b.max()) < n
        )
        member[i, b] = 1
    trials = member.numel()
    rate = float(member.mean())
    # Bernoulli(q) per (batch, example): the overall rate is within 5 standard errors of q
    assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / trials)
    # batch sizes are Binomial(n, q), not fixed: their variance is about n q (1 - q)
    sizes = member.sum(1).numpy()
    assert 0.6 < sizes.var(ddof=1) / (n * q * (1 - q)) < 1.5
    # memberships are independent across batches: per-example counts are Binomial(B, q)
    counts = member.sum(0).numpy()
    assert 0.8 < counts.var(ddof=1) / (len(batches) * q * (1 - q)) < 1.2
    # and across examples within a batch: neighbours are uncorrelated
    corr = np.corrcoef(member[:, :-1].reshape(-1).numpy(), member[:, 1:].reshape(-1).numpy())[0, 1]
    assert abs(corr) < 5 / math.sqrt(trials)


def test_poisson_batches_are_seeded_and_validated():
    a = list(poisson_batches(100, sample_rate=0.1, generator=torch.Generator().manual_seed(3)))
    b = list(poisson_batches(100, sample_rate=0.1, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert [b.tolist() for b in poisson_batches(5, sample_rate=1.0)] == [[0, 1, 2, 3, 4]]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sample_rate"):
            list(poisson_batches(10, sample_rate=bad))


def test_empty_batches_count_as_steps_without_data_and_still_run_the_hooks():
    x, y = _toy()
    model = build_model("logistic", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooked = []

    def sampler(n, generator):
        return [torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)]

    result = train(
        model, x, y, epochs=2, lr=0.5, batch_sampler=sampler, grad_hook=lambda m: hooked.append(1)
    )
    assert result.steps == 4 and result.samples == 0 and result.loss == 0.0
    assert len(hooked) == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # with a penalty the step still moves the weights (weight decay on an empty batch)
    result = train(
        model,
        x,
        y,
        epochs=1,
        lr=0.5,
        batch_sampler=sampler,
        penalty=lambda m: (m[1].weight ** 2).sum(),
    )
    torch.testing.assert_close(model[1].weight, before["1.weight"] * (1 - 2 * 0.5) ** 2)
    assert math.isfinite(result.loss)


def test_poisson_sampled_training_runs_through_train():
    x, y = _toy(n=50)
    model = build_model("logistic", seed=0)

    def sampler(n, generator):
        return poisson_batches(n, sample_rate=0.02, generator=generator)  # many empty batches

    result = train(
        model,
        x,
        y,
        epochs=3,
        lr=0.1,
        batch_sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 3 * 50
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # the same batches as drawing them directly from an equally seeded generator
    gen = torch.Generator().manual_seed(0)
    assert result.samples == sum(
        len(b) for _ in range(3) for b in poisson_batches(50, sample_rate=0.02, generator=gen)
    )


def test_poisson_batches_as_documented_works_as_a_batch_sampler():
    x, y = _toy(n=50)
    sampler = functools.partial(poisson_batches, sample_rate=0.1)
    result = train(
        build_model("logistic", seed=0),
        x,
        y,
        epochs=1,
        lr=0.1,
        batch_sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 10


def test_device_cpu_gives_the_same_training_as_no_device():
    x, y = _toy()
    states = []
    for device in (None, "cpu", torch.device("cpu")):
        model = build_model("mlp", seed=0)
        train(
            model,
            x,
            y,
            epochs=1,
            batch_size=8,
            lr=0.1,
            device=device,
            generator=torch.Generator().manual_seed(1),
        )
        states.append(model.state_dict())
    for s in states[1:]:
        assert all(torch.equal(s[k], states[0][k]) for k in s)


def test_record_losses_returns_one_loss_per_step():
    x, y = _toy(n=30)
    result = train(
        build_model("logistic", seed=0), x, y, epochs=1, batch_size=10, record_losses=True
    )
    assert len(result.losses) == 3 and result.loss == pytest.approx(np.mean(result.losses))
