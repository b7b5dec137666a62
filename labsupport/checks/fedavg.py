"""Checks for exercise 1, FedAvg from scratch (notebook ``06_exercises_fedavg``).

The reference is chapter 01's FedAvg (McMahan et al. 2017, Algorithm 1): the sample-weighted mean
``w = sum_{k in S_t} (n_k / n) w^k`` with ``n = sum_{k in S_t} n_k`` (:func:`labsupport.fl.aggregate`)
and ``ClientUpdate`` (:func:`labsupport.fl.local_update`). Client updates are compared where they are
independent of the batch order: full-batch gradient steps, and one epoch at a tiny learning rate
(where mini-batch SGD moves ``lr * sum_b mean_b grad``, whatever the order of the batches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from labsupport.fl import TrainConfig, aggregate, clone_state, local_update

from ._core import CheckFailed, as_state, call, close, ensure, passed, rng

__all__ = [
    "check_client_update",
    "check_convergence",
    "check_fedavg_round",
    "check_weighted_average",
]


def _states(gen: torch.Generator, num: int) -> list[dict[str, torch.Tensor]]:
    """``num`` random state dicts with a float matrix, a float vector and an int64 counter."""
    return [
        {
            "fc.weight": torch.randn(3, 4, generator=gen),
            "fc.bias": torch.randn(3, generator=gen),
            "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=gen),
        }
        for _ in range(num)
    ]


def _max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def _matches(got, want, keys) -> bool:
    return all(close(got[k], want[k]) for k in keys)


def check_weighted_average(weighted_average: Callable, *, trials: int = 5, seed: int | None = None):
    """Step 1: ``weighted_average(states, num_samples)`` is FedAvg's sample-weighted mean."""
    gen = rng(seed)
    name = "weighted_average"
    # one client: the average is that client, whatever its count
    (one,) = _states(gen, 1)
    out = as_state(call(weighted_average, [clone_state(one)], [7], what="one client"), name)
    ensure(
        set(out) == set(one),
        f"{name} returned keys {sorted(out)}; expected the model's keys {sorted(one)}",
    )
    for k, v in one.items():
        ensure(
            tuple(out[k].shape) == tuple(v.shape),
            f"wrong shape for {k!r}: got {tuple(out[k].shape)}, expected {tuple(v.shape)} "
            "(average over clients, not over the entries of a tensor)",
        )
        ensure(
            out[k].dtype == v.dtype, f"{k!r} has dtype {out[k].dtype}; keep the model's {v.dtype}"
        )
    if _max_diff(out, one) > 1e-6:
        ensure(
            not _matches(out, {k: 7 * v for k, v in one.items()}, ["fc.weight"]),
            "the weights do not sum to 1: one client with n_k = 7 came back multiplied by 7; "
            "divide by n = sum of the counts",
        )
        raise CheckFailed("with one client the average must be that client's model")
    floats = ["fc.weight", "fc.bias"]
    for _ in range(trials):
        num = int(torch.randint(2, 6, (1,), generator=gen))
        states = _states(gen, num)
        counts = [int(c) for c in torch.randint(1, 500, (num,), generator=gen)]
        counts[0] = 1000  # one big client: the weights clearly matter
        before = [clone_state(s) for s in states]
        got = as_state(call(weighted_average, states, list(counts), what=f"{num} clients"), name)
        want = aggregate(before, counts)
        ensure(
            all(_max_diff(s, b) == 0 for s, b in zip(states, before, strict=True)),
            f"{name} changed the client states it was given; work on copies",
        )
        for k in want:
            ensure(
                k in got and tuple(got[k].shape) == tuple(want[k].shape),
                f"wrong shape for {k!r}: got {tuple(got[k].shape) if k in got else 'nothing'}, "
                f"expected {tuple(want[k].shape)}",
            )
            ensure(
                got[k].dtype == want[k].dtype,
                f"{k!r} has dtype {got[k].dtype}; keep the model's {want[k].dtype} "
                "(integer buffers such as num_batches_tracked stay integers)",
            )
        if not _matches(got, want, floats):
            unweighted = aggregate(before, [1] * num)
            total = sum(counts)
            summed = {k: sum(c * s[k] for c, s in zip(counts, before, strict=True)) for k in floats}
            if _matches(got, unweighted, floats):
                raise CheckFailed(
                    "unweighted average: every client counted equally; client k must count n_k / n"
                )
            if _matches(got, summed, floats) or _matches(
                got, {k: v / num for k, v in summed.items()}, floats
            ):
                raise CheckFailed(
                    f"the weights do not sum to 1: divide by n = sum of the counts ({total})"
                )
            raise CheckFailed(
                f"values differ from the sample-weighted average by up to {_max_diff(got, want):.3g} "
                f"({num} clients, counts {counts})"
            )
        diff = int((got["bn.num_batches_tracked"] - want["bn.num_batches_tracked"]).abs())
        ensure(
            diff <= 1,
            f"the integer buffer is off by {diff}: average it with the same weights, then round",
        )
    passed("weighted_average", f"{trials} random rounds, one client, an integer buffer")


def _tiny_model(gen: torch.Generator) -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _gd_steps(model: nn.Module, state, x, y, lr: float, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` full-batch gradient steps from ``state`` (the order-free reference)."""
    model.load_state_dict(state)
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return clone_state(model.state_dict())


def _unpack(reply: object, what: str) -> tuple[dict, object]:
    ensure(
        isinstance(reply, tuple) and len(reply) == 2,
        f"client_update returned a {type(reply).__name__}; expected a tuple (state, num_samples)",
    )
    return as_state(reply[0], "client_update"), reply[1]


def check_client_update(client_update: Callable, *, seed: int | None = None) -> None:
    """Step 2: ``client_update(model, global_state, x, y, *, epochs, batch_size, lr, seed)``."""
    gen = rng(seed)
    model = _tiny_model(gen)
    global_state = clone_state(_tiny_model(gen).state_dict())  # differs from `model`'s weights
    x, y = torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    kept = clone_state(global_state)
    own = clone_state(model.state_dict())
    reply = call(
        client_update,
        model,
        global_state,
        x,
        y,
        epochs=1,
        batch_size=None,
        lr=0.5,
        seed=0,
        what="one full-batch epoch",
    )
    state, n = _unpack(reply, "client_update")
    ensure(
        _max_diff(global_state, kept) == 0,
        "client_update changed global_state: the server's model must reach the client as a copy",
    )
    ensure(
        set(state) == set(global_state),
        f"returned keys {sorted(state)}; expected {sorted(global_state)}",
    )
    want = _gd_steps(_tiny_model(gen), kept, x, y, 0.5, 1)
    if not _matches(state, want, want):
        ensure(
            _max_diff(state, kept) > 1e-9,
            "the returned state equals global_state: the client did not train",
        )
        if _matches(state, _gd_steps(_tiny_model(gen), own, x, y, 0.5, 1), want):
            raise CheckFailed(
                "the client trained from the model's own weights: load global_state into it first"
            )
        raise CheckFailed(
            "one full-batch epoch must be one gradient step from global_state; your state differs "
            f"from it by up to {_max_diff(state, want):.3g}"
        )
    snapshot = clone_state(state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ensure(
        _max_diff(state, snapshot) == 0,
        "the returned state changes when the model is trained further: you returned the live "
        "state_dict(); return a detached copy",
    )
    state2, _ = _unpack(
        call(
            client_update,
            model,
            kept,
            x,
            y,
            epochs=2,
            batch_size=None,
            lr=0.5,
            seed=0,
            what="two full-batch epochs",
        ),
        "client_update",
    )
    ensure(
        _matches(state2, _gd_steps(_tiny_model(gen), kept, x, y, 0.5, 2), kept),
        "with epochs=2 and the whole dataset as one batch, expected two gradient steps",
    )
    # mini-batches of 4 over 12 samples at a tiny learning rate: the model moves by
    # lr * (sum over the 3 batches of each batch's mean gradient) = 3 full-batch steps, in any order
    lr = 1e-4
    state3, n3 = _unpack(
        call(
            client_update,
            model,
            kept,
            x,
            y,
            epochs=1,
            batch_size=4,
            lr=lr,
            seed=1,
            what="one epoch in batches of 4",
        ),
        "client_update",
    )
    ensure(
        not isinstance(n3, bool) and isinstance(n3, (int, float)) and n3 == len(y),
        f"num_samples is {n3!r}; expected the number of examples ({len(y)}), not of batches",
    )
    ensure(n == len(y), f"num_samples is {n!r} for a full batch; expected {len(y)}")
    moved = {k: state3[k] - kept[k] for k in kept}
    step = {k: _gd_steps(_tiny_model(gen), kept, x, y, lr, 1)[k] - kept[k] for k in kept}
    ratio = sum(float((moved[k] * step[k]).sum()) for k in kept) / sum(
        float((step[k] ** 2).sum()) for k in kept
    )
    ensure(
        abs(ratio - 3) < 0.05,
        f"one epoch in batches of 4 over 12 samples moved the model {ratio:.2f} gradient steps; "
        "expected 3 (every sample once per epoch, one step per batch, the batch's mean loss)",
    )
    passed("client_update", "starts from global_state, trains, returns a copy and n_k")


def check_fedavg_round(
    fedavg_round: Callable, *, seed: int | None = None, num_clients: int = 5
) -> None:
    """Step 3: ``fedavg_round(model, global_state, clients, selected, *, epochs, batch_size, lr,
    seed)`` trains the selected clients from the same global model and averages them by n_k."""
    gen = rng(seed)
    model = _tiny_model(gen)
    global_state = clone_state(model.state_dict())
    sizes = [int(s) for s in torch.randint(3, 30, (num_clients,), generator=gen)]
    clients = [
        (torch.randn(s, 5, generator=gen), torch.randint(0, 3, (s,), generator=gen)) for s in sizes
    ]
    selected = [0, 2, 3]
    cfg = TrainConfig(local_epochs=1, batch_size=None, lr=0.5)
    kept = clone_state(global_state)
    got = as_state(
        call(
            fedavg_round,
            model,
            global_state,
            clients,
            selected,
            epochs=1,
            batch_size=None,
            lr=0.5,
            seed=0,
            what=f"{num_clients} clients, {len(selected)} selected",
        ),
        "fedavg_round",
    )
    ensure(_max_diff(global_state, kept) == 0, "fedavg_round changed global_state in place")
    scratch = _tiny_model(gen)
    local = {k: local_update(scratch, kept, *clients[k], cfg)[0] for k in range(num_clients)}
    want = aggregate([local[k] for k in selected], [sizes[k] for k in selected])
    if _matches(got, want, want):
        passed("fedavg_round", "selected clients, trained from one global model, weighted by n_k")
        return
    everyone = aggregate([local[k] for k in range(num_clients)], sizes)
    if _matches(got, everyone, want):
        raise CheckFailed("you averaged every client; only the selected clients train in a round")
    n_all = sum(sizes)
    scaled = {k: sum(sizes[c] * local[c][k] for c in selected) / n_all for k in want}
    if _matches(got, scaled, want):
        raise CheckFailed(
            "n must be the sum of the *selected* clients' counts; you divided by all clients'"
        )
    if _matches(got, local[selected[-1]], want):
        raise CheckFailed(
            "the result is the last selected client's model: every reply aliases one model "
            "(copy each client's state before the next client trains)"
        )
    chained, state = [], kept
    for k in selected:
        state = local_update(scratch, state, *clients[k], cfg)[0]
        chained.append(state)
    if _matches(got, aggregate(chained, [sizes[k] for k in selected]), want):
        raise CheckFailed(
            "each client started from the previous client's model; all must start from global_state"
        )
    if _matches(got, aggregate([local[k] for k in selected], [1] * len(selected)), want):
        raise CheckFailed("unweighted average of the selected clients: weight each by n_k / n")
    raise CheckFailed(
        f"the new global model differs from FedAvg's by up to {_max_diff(got, want):.3g}"
    )


def check_convergence(
    yours: Sequence[float], reference: Sequence[float], *, tolerance: float = 0.05
) -> None:
    """Step 4: your FedAvg's accuracy per round tracks the chapter 01 simulator's on the same run."""
    ensure(
        len(yours) == len(reference) and len(yours) > 0,
        f"got {len(yours)} accuracies for {len(reference)} reference rounds; record one per round",
    )
    ensure(
        all(0.0 <= a <= 1.0 for a in yours),
        "accuracies must be fractions in [0, 1] (evaluate the global model after each round)",
    )
    gap = abs(yours[-1] - reference[-1])
    ensure(
        gap <= tolerance,
        f"final accuracy {yours[-1]:.3f} vs the reference's {reference[-1]:.3f}: a gap of "
        f"{gap:.3f} is above {tolerance} (same clients, same selection, same hyperparameters?)",
    )
    ensure(
        max(yours) > yours[0] or len(yours) == 1,
        "accuracy never rose above the first round's: the global model is not learning",
    )
    passed("convergence", f"final accuracy {yours[-1]:.3f} vs reference {reference[-1]:.3f}")
