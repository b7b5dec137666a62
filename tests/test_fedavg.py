from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl import (
    UpdateRejected,
    aggregate,
    client_seed,
    local_update,
    select_clients,
    validate_update,
)
from labsupport.models import build_model


def _bn_state(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    for _ in range(seed + 1):
        model(torch.randn(8, 4))  # moves running stats and num_batches_tracked
    return model.state_dict()


def test_aggregate_is_the_sample_weighted_mean_for_every_entry():
    states = [_bn_state(s) for s in range(3)]
    weights = [10, 30, 60]
    out = aggregate(states, weights)
    for key in states[0]:
        stacked = np.stack([s[key].double().numpy() for s in states])
        expected = np.tensordot(np.array(weights) / 100.0, stacked, axes=1)
        if states[0][key].is_floating_point():
            np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: int64, rounded weighted mean (1*.1 + 2*.3 + 3*.6 = 2.5 -> 2)
            assert out[key].dtype == torch.int64
            assert out[key].item() == round(float(expected))
        assert out[key].dtype == states[0][key].dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_aggregate_keeps_non_float32_dtypes(dtype):
    a = {"w": torch.tensor([1.0, 2.0], dtype=dtype)}
    b = {"w": torch.tensor([3.0, 6.0], dtype=dtype)}
    out = aggregate([a, b], [1, 3])
    assert out["w"].dtype == dtype
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0], dtype=dtype))


def test_aggregate_of_one_client_is_that_client():
    state = _bn_state(1)
    out = aggregate([state], [7])
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_aggregate_bool_entries_take_the_weighted_majority():
    out = aggregate(
        [{"m": torch.tensor([True, False])}, {"m": torch.tensor([False, False])}], [3, 1]
    )
    assert out["m"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], [], "empty round"),
        ([{"w": torch.ones(1)}], [1, 2], "1 states but 2 weights"),
        ([{"w": torch.ones(1)}], [0], "weights must be finite and > 0"),
        ([{"w": torch.ones(1)}], [float("nan")], "weights must be finite"),
    ],
)
def test_aggregate_rejects_bad_rounds(states, weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate(states, weights)


def _global():
    return build_model("mlp", seed=0).state_dict()


@pytest.mark.parametrize(
    ("mutate", "weight", "message"),
    [
        (lambda s: s.pop("fc1.bias"), 10, r"missing \['fc1.bias'\]"),
        (lambda s: s.update(extra=torch.zeros(1)), 10, r"unexpected \['extra'\]"),
        (
            lambda s: s.update({"fc1.weight": torch.zeros(64, 40)}),
            10,
            r"shape \(64, 40\) for 'fc1.weight'; the global model has \(100, 40\)",
        ),
        (lambda s: s.update({"fc2.bias": s["fc2.bias"].double()}), 10, "dtype torch.float64"),
        (lambda s: s["fc3.weight"].__setitem__((0, 0), float("nan")), 10, "non-finite"),
        (lambda s: s["fc3.bias"].__setitem__(0, float("inf")), 10, "non-finite"),
        (lambda s: s.update({"fc3.bias": [0.0] * 10}), 10, "expected a tensor"),
        (lambda s: None, 0, "must be a finite number > 0"),
        (lambda s: None, -5, "must be a finite number > 0"),
        (lambda s: None, math.inf, "must be a finite number > 0"),
        (lambda s: None, "10", "not a number"),
    ],
)
def test_validate_update_names_what_is_wrong(mutate, weight, message):
    update = {k: v.clone() for k, v in _global().items()}
    mutate(update)
    with pytest.raises(UpdateRejected, match=message) as info:
        validate_update(_global(), update, weight, client=3)
    assert str(info.value).startswith("client 3 ") and info.value.client == 3


def test_validate_update_rejects_non_dicts_and_accepts_a_good_update():
    with pytest.raises(UpdateRejected, match="expected a state dict"):
        validate_update(_global(), [1, 2], 1)
    validate_update(_global(), _global(), 12)


def test_select_clients_is_seeded_sized_and_distinct():
    a = select_clients(100, 0.1, seed=1, server_round=3)
    assert a == select_clients(100, 0.1, seed=1, server_round=3)
    assert a != select_clients(100, 0.1, seed=1, server_round=4)
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert len(select_clients(100, 0.001, min_clients=2)) == 2  # max(C*K, min)
    assert select_clients(5, 1.0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 0.5), "num_clients"), ((10, 0.0), "fraction"), ((10, 1.5), "fraction")],
)
def test_select_clients_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        select_clients(*args)


def test_client_seed_depends_on_every_part():
    seeds = {client_seed(s, r, c) for s in (0, 1) for r in (1, 2) for c in (0, 1)}
    assert len(seeds) == 8 and client_seed(0, 1, 0) == client_seed(0, 1, 0)


def test_local_update_trains_from_the_global_state_without_touching_it():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 40, generator=g), torch.randint(0, 10, (40,), generator=g)
    global_state = _global()
    snapshot = {k: v.clone() for k, v in global_state.items()}
    scratch = build_model("mlp", seed=99)  # other weights: must be overwritten
    state, result = local_update(
        scratch, global_state, x, y, epochs=2, batch_size=10, lr=0.1, seed=4
    )
    assert result.steps == 8
    assert all(torch.equal(global_state[k], snapshot[k]) for k in snapshot)
    again, _ = local_update(
        build_model("mlp"), global_state, x, y, epochs=2, batch_size=10, lr=0.1, seed=4
    )
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["fc1.weight"], global_state["fc1.weight"])


def test_fedsgd_round_equals_one_full_batch_gradient_step_on_the_union():
    # FedSGD (E=1, B=inf): averaging one full-batch step per client, weighted by n_k, equals one
    # gradient step on all the data -- the identity of McMahan et al. (2017), Section 2.
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 40, generator=g) for n in (10, 30)]
    ys = [torch.randint(0, 10, (len(x),), generator=g) for x in xs]
    global_state = build_model("logistic", seed=0).state_dict()
    states = [
        local_update(build_model("logistic"), global_state, x, y, batch_size=None, lr=0.3)[0]
        for x, y in zip(xs, ys, strict=True)
    ]
    averaged = aggregate(states, [10, 30])
    central = build_model("logistic")
    local_update(central, global_state, torch.cat(xs), torch.cat(ys), batch_size=None, lr=0.3)
    for k, v in central.state_dict().items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-6)
