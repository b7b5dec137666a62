"""State dicts (labsupport.fl.state): copies, deltas, validation, and FedAvg's weighted average."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl.state import (
    UpdateRejected,
    aggregate,
    apply_delta,
    clone_state,
    mix_states,
    normalized_weights,
    state_delta,
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


def _global():
    return build_model("mlp", seed=0).state_dict()


# ----------------------------------------------------------------------------- aggregate
def test_aggregate_is_the_sample_weighted_mean_for_every_entry():
    states = [_bn_state(s) for s in range(3)]
    weights = [10, 30, 60]
    out = aggregate(states, weights)
    for key in states[0]:
        stacked = np.stack([s[key].double().numpy() for s in states])
        expected = np.tensordot(np.array(weights) / 100.0, stacked, axes=1)
        if states[0][key].is_floating_point():
            np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: int64, the rounded weighted mean (exactness: the next test)
            assert out[key].dtype == torch.int64
            assert abs(out[key].item() - float(expected)) <= 0.5 + 1e-9
        assert out[key].dtype == states[0][key].dtype


def test_integer_average_is_exact_for_counts_that_are_not_powers_of_two():
    counts, values = [10, 30, 60], [1, 2, 3]
    states = [{"n": torch.tensor(v, dtype=torch.int64)} for v in values]
    exact = Fraction(sum(c * v for c, v in zip(counts, values, strict=True)), sum(counts))
    assert exact == Fraction(5, 2)
    assert aggregate(states, counts)["n"].item() == round(exact) == 2


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
    assert out["m"].dtype == torch.bool


def test_aggregate_does_not_modify_or_alias_its_inputs():
    states = [_bn_state(s) for s in range(2)]
    copies = [clone_state(s) for s in states]
    out = aggregate(states, [1, 1])
    for key in out:
        out[key].add_(1) if out[key].dtype != torch.bool else None
    for s, c in zip(states, copies, strict=True):
        assert all(torch.equal(s[k], c[k]) for k in s)


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], [], "empty round"),
        ([{"w": torch.ones(1)}], [1, 2], "1 states but 2 weights"),
        ([{"w": torch.ones(1)}], [0], "weights must be finite and > 0"),
        ([{"w": torch.ones(1)}], [-1], "weights must be finite and > 0"),
        ([{"w": torch.ones(1)}], [float("nan")], "weights must be finite"),
        ([{"w": torch.ones(1)}], [math.inf], "weights must be finite"),
    ],
)
def test_aggregate_rejects_bad_rounds(states, weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate(states, weights)


def test_normalized_weights_sum_to_one_even_for_counts_that_would_overflow():
    w = normalized_weights([1e308, 1e308, 1e308])
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([1 / 3] * 3, rel=1e-15)
    w = normalized_weights([5e-324, 5e-324])  # the smallest subnormals
    assert w.tolist() == [0.5, 0.5]
    w = normalized_weights([10, 30, 60])
    assert w.tolist() == pytest.approx([0.1, 0.3, 0.6], rel=1e-15)


def test_mix_states_matches_the_matrix_product():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g, dtype=torch.float64)} for _ in range(3)]
    w = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    out = mix_states(states, w)
    x = np.stack([s["w"].numpy().reshape(-1) for s in states])
    got = np.stack([o["w"].numpy().reshape(-1) for o in out])
    np.testing.assert_allclose(got, w.double().numpy() @ x, rtol=1e-15, atol=1e-15)
    # the outputs are independent tensors, not views of one another or of the inputs
    before = [o["w"].clone() for o in out]
    out[0]["w"].add_(1.0)
    assert torch.equal(out[1]["w"], before[1]) and torch.equal(out[2]["w"], before[2])
    out[1]["w"].add_(1.0)
    assert torch.equal(states[1]["w"], before[1])


def test_integer_average_rounds_half_to_even():
    # weights 1/2, 1/2 are exact: (1 + 2) / 2 = 1.5 -> 2, (2 + 3) / 2 = 2.5 -> 2,
    # (-1 + -2) / 2 = -1.5 -> -2
    a = {"n": torch.tensor([1, 2, -1], dtype=torch.int64)}
    b = {"n": torch.tensor([2, 3, -2], dtype=torch.int64)}
    out = aggregate([a, b], [5, 5])
    expected = [round(Fraction(x + y, 2)) for x, y in zip([1, 2, -1], [2, 3, -2], strict=True)]
    assert out["n"].tolist() == expected == [2, 2, -2]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_integer_average_keeps_small_integer_dtypes(dtype):
    a = {"n": torch.tensor([0, 100], dtype=dtype)}
    b = {"n": torch.tensor([4, 120], dtype=dtype)}
    out = aggregate([a, b], [1, 3])
    assert out["n"].dtype == dtype and out["n"].tolist() == [3, 115]


# ----------------------------------------------------------------------------- deltas
def test_state_delta_and_apply_delta_are_inverse_and_keep_integer_buffers_as_values():
    ref = _bn_state(0)
    state = _bn_state(2)
    delta = state_delta(state, ref)
    for key, v in state.items():
        if v.is_floating_point():
            torch.testing.assert_close(delta[key], v - ref[key], rtol=0, atol=0)
        else:  # num_batches_tracked travels as its value, not a difference
            assert torch.equal(delta[key], v)
    back = apply_delta(ref, delta)
    for key, v in state.items():
        assert back[key].dtype == v.dtype
        torch.testing.assert_close(back[key], v, rtol=1e-6, atol=1e-7)


def test_clone_state_is_a_detached_independent_copy():
    model = build_model("logistic", seed=0)
    live = model.state_dict()
    copy = clone_state(live)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    assert not torch.equal(copy["1.weight"], live["1.weight"])
    assert all(not v.requires_grad for v in copy.values())


# ----------------------------------------------------------------------------- validation
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
        (
            lambda s: s.update({"fc3.bias": s["fc3.bias"].to_sparse()}),
            10,
            "expected a dense one",
        ),
        (lambda s: None, 0, "must be a finite number > 0"),
        (lambda s: None, -5, "must be a finite number > 0"),
        (lambda s: None, math.inf, "must be a finite number > 0"),
        (lambda s: None, math.nan, "must be a finite number > 0"),
        (lambda s: None, "10", "not a number"),
        (lambda s: None, True, "not a number"),
        (lambda s: None, None, "not a number"),
    ],
)
def test_validate_update_names_what_is_wrong(mutate, weight, message):
    update = clone_state(_global())
    mutate(update)
    with pytest.raises(UpdateRejected, match=message) as info:
        validate_update(_global(), update, weight, client=3)
    assert str(info.value).startswith("client 3 ") and info.value.client == 3
    assert info.value.reason in str(info.value)


def test_validate_update_rejects_non_dicts_and_accepts_a_good_update():
    with pytest.raises(UpdateRejected, match="expected a state dict"):
        validate_update(_global(), [1, 2], 1)
    validate_update(_global(), _global(), 12)
    validate_update(_global(), _global(), np.float32(0.5))
    validate_update(_global(), _global(), np.int64(3))
