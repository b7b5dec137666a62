from __future__ import annotations

import pytest
import torch

from labsupport.models import build_model
from labsupport.train import batch_indices, evaluate, fit, train


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
