"""The FedAvg checks pass the solution and fail plausible wrong implementations, naming the error."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from labsupport.checks import (
    CheckFailed,
    check_client_update,
    check_convergence,
    check_fedavg_round,
    check_weighted_average,
)


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("fedavg")


def test_solution_passes_every_fedavg_check(sol, capsys):
    check_weighted_average(sol["weighted_average"], seed=0)
    check_client_update(sol["client_update"], seed=0)
    check_fedavg_round(sol["fedavg_round"], seed=0)
    assert capsys.readouterr().out.count("passed") == 3


# ------------------------------------------------------------------ weighted_average
def unweighted(states, num_samples):
    return {
        k: sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
        for k, v in states[0].items()
    }


def unnormalized(states, num_samples):
    return {
        k: sum(n * s[k].double() for s, n in zip(states, num_samples, strict=False)).to(v.dtype)
        for k, v in states[0].items()
    }


def flattened(states, num_samples):  # averages over the entries: wrong shape
    total = sum(num_samples)
    return {
        k: sum(
            n / total * s[k].double().mean() for s, n in zip(states, num_samples, strict=False)
        ).to(v.dtype)
        for k, v in states[0].items()
    }


def floats_everywhere(states, num_samples):  # integer buffer comes back as float
    total = sum(num_samples)
    return {
        k: sum(n / total * s[k].double() for s, n in zip(states, num_samples, strict=False)).float()
        for k in states[0]
    }


def in_place(states, num_samples):  # accumulates into the first client's tensors
    total = sum(num_samples)
    out = states[0]
    for k in out:
        acc = out[k].double() * (num_samples[0] / total)
        for s, n in zip(states[1:], num_samples[1:], strict=False):
            acc += n / total * s[k].double()
        if out[k].is_floating_point():
            out[k].copy_(acc)
        else:
            out[k].copy_(acc.round())
    return out


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (unweighted, "unweighted average"),
        (unnormalized, "do not sum to 1"),
        (flattened, "wrong shape"),
        (floats_everywhere, "dtype"),
        (in_place, "changed the client states"),
    ],
)
def test_weighted_average_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_weighted_average(wrong, seed=1)


def test_a_stub_raises_not_implemented_through_the_check():
    def stub(states, num_samples):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        check_weighted_average(stub, seed=0)


def test_a_crash_in_student_code_is_reported_with_the_input():
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError.*one client"):
        check_weighted_average(lambda states, num_samples: 1 / 0, seed=0)


# ------------------------------------------------------------------ client_update
def _train(model, x, y, epochs, batch_size, lr, seed):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    size = len(y) if batch_size is None else batch_size
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), size):
            idx = order[i : i + size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def live_state(model, global_state, x, y, *, epochs, batch_size, lr, seed):
    model.load_state_dict(global_state)
    _train(model, x, y, epochs, batch_size, lr, seed)
    return model.state_dict(), len(y)


def counts_batches(model, global_state, x, y, *, epochs, batch_size, lr, seed):
    model.load_state_dict(global_state)
    _train(model, x, y, epochs, batch_size, lr, seed)
    size = len(y) if batch_size is None else batch_size
    return {k: v.clone() for k, v in model.state_dict().items()}, -(-len(y) // size)


def own_weights(model, global_state, x, y, *, epochs, batch_size, lr, seed):
    _train(model, x, y, epochs, batch_size, lr, seed)
    return {k: v.clone() for k, v in model.state_dict().items()}, len(y)


def summed_loss(model, global_state, x, y, *, epochs, batch_size, lr, seed):
    model.load_state_dict(global_state)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    size = len(y) if batch_size is None else batch_size
    for _ in range(epochs):
        for i in range(0, len(y), size):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + size]), y[i : i + size], reduction="sum").backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, len(y)


def one_batch_per_epoch(model, global_state, x, y, *, epochs, batch_size, lr, seed):
    model.load_state_dict(global_state)
    size = len(y) if batch_size is None else batch_size
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x[:size]), y[:size]).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, len(y)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (live_state, "live"),
        (counts_batches, "not of batches"),
        (own_weights, "own weights"),
        (summed_loss, "gradient step"),
        (one_batch_per_epoch, "expected 3"),
    ],
)
def test_client_update_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_client_update(wrong, seed=3)


# ------------------------------------------------------------------ fedavg_round
def _round(sol, *, chain=False, everyone=False, denominator_all=False, alias=False):
    cu, wa = sol["client_update"], sol["weighted_average"]

    def fedavg_round(model, global_state, clients, selected, *, epochs, batch_size, lr, seed):
        ids = range(len(clients)) if everyone else selected
        states, counts, start = [], [], global_state
        for k in ids:
            s, n = cu(
                model,
                start,
                *clients[k],
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed + k,
            )
            if alias:
                s = model.state_dict()
            if chain:
                start = s
            states.append(s)
            counts.append(n)
        if denominator_all:
            total = sum(len(y) for _, y in clients)
            return {
                k: sum(n / total * s[k] for s, n in zip(states, counts, strict=False))
                for k in states[0]
            }
        return wa(states, counts)

    return fedavg_round


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("chain", "previous client"),
        ("everyone", "only the selected"),
        ("denominator_all", "selected\\* clients' counts"),
        ("alias", "last selected client"),
    ],
)
def test_fedavg_round_check_names_the_mistake(sol, kind, message):
    with pytest.raises(CheckFailed, match=message):
        check_fedavg_round(_round(sol, **{kind: True}), seed=5)


# ------------------------------------------------------------------ convergence
def test_convergence_check_accepts_a_close_curve_and_rejects_a_far_or_flat_one(capsys):
    check_convergence([0.2, 0.4, 0.6], [0.25, 0.45, 0.62])
    with pytest.raises(CheckFailed, match="gap"):
        check_convergence([0.2, 0.3, 0.4], [0.25, 0.45, 0.62])
    with pytest.raises(CheckFailed, match="not learning"):
        check_convergence([0.6, 0.6, 0.6], [0.25, 0.45, 0.62])
    with pytest.raises(CheckFailed, match="one per round"):
        check_convergence([0.6], [0.25, 0.45, 0.62])
    with pytest.raises(CheckFailed, match="fractions"):
        check_convergence([20.0, 40.0, 61.0], [0.25, 0.45, 0.62])
