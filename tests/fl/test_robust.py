"""Robust aggregators checked against independent numpy computations, with the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labsupport.fl.clients import FitReply
from labsupport.fl.robust import (
    CenteredClipping,
    GeometricMedian,
    InverseLossWeighting,
    Krum,
    Median,
    MultiKrum,
    NormBounding,
    TrimmedMean,
    centered_clip,
    coordinate_median,
    geometric_median,
    inverse_loss_weights,
    krum_scores,
    krum_select,
    norm_bounded_mean,
    pairwise_sq_distances,
    trimmed_mean,
)


def _np_trim_mean(a: np.ndarray, beta: float) -> np.ndarray:
    k = int(beta * len(a))
    s = np.sort(a, axis=0)
    return s[k : len(a) - k].mean(0)


def _np_krum_scores(a: np.ndarray, f: int) -> np.ndarray:
    n = len(a)
    flat = a.reshape(n, -1).astype(np.float64)
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    m = min(max(1, n - f - 2), n - 1)
    return np.array([np.sort(np.delete(d[i], i))[:m].sum() for i in range(n)])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_median_equals_numpy_median_for_odd_and_even_counts(n):
    a = np.random.default_rng(n).normal(size=(n, 3, 5)).astype(np.float32)
    got = coordinate_median(torch.from_numpy(a))
    np.testing.assert_allclose(got.numpy(), np.median(a, axis=0), rtol=1e-6, atol=1e-7)


def test_median_of_even_count_is_the_mean_of_the_middle_pair_not_the_lower_value():
    x = torch.tensor([[1.0], [2.0], [10.0], [4.0]])
    assert coordinate_median(x).item() == 3.0  # torch.median would say 2.0


def test_median_with_ties_and_single_client():
    assert coordinate_median(torch.tensor([[5.0], [5.0], [1.0]])).item() == 5.0
    one = torch.tensor([[1.5, -2.0]])
    assert torch.equal(coordinate_median(one), one[0])


def test_median_of_integers_is_exact_and_rounds_half_to_even():
    big = 2**62 + 1
    x = torch.tensor(
        [[big, 1, 2], [big, 2, 3], [big - 2, 5, 7], [big + 4, 6, 8]], dtype=torch.int64
    )
    got = coordinate_median(x)
    assert got.dtype == torch.int64
    # middle pairs: (big, big) -> big; (2, 5) -> 3.5 -> 4; (3, 7) -> 5
    assert got.tolist() == [big, 4, 5]


@pytest.mark.parametrize("n,beta", [(1, 0.0), (2, 0.2), (5, 0.1), (5, 0.2), (10, 0.1), (10, 0.45)])
def test_trimmed_mean_equals_numpy(n, beta):
    a = np.random.default_rng(7 * n).normal(size=(n, 6)).astype(np.float64)
    got = trimmed_mean(torch.from_numpy(a), beta)
    np.testing.assert_allclose(got.numpy(), _np_trim_mean(a, beta), rtol=1e-12)


def test_trimmed_mean_keeps_all_values_when_trim_is_zero():
    x = torch.tensor([[1.0], [2.0], [6.0]])  # int(0.1 * 3) = 0: the naive [0:-0] slice is empty
    out = trimmed_mean(x, 0.1)
    assert not torch.isnan(out).any()
    assert out.item() == pytest.approx(3.0)


def test_trimmed_mean_refuses_a_trim_that_removes_everything():
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(torch.ones(4, 2), num_trim=2)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(torch.ones(4, 2), 0.5)
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(-0.1)


def test_trimmed_mean_of_integers_is_exact():
    x = torch.tensor([[0], [1], [2], [100]], dtype=torch.int64)
    assert trimmed_mean(x, 0.25).item() == 2  # (1 + 2) / 2 = 1.5 -> 2 (half to even)


@pytest.mark.parametrize("fn", [coordinate_median, lambda x: trimmed_mean(x, 0.1), krum_scores])
def test_function_forms_refuse_nan(fn):
    x = torch.zeros(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"client\(s\) \[2\]"):
        fn(x)


def test_function_forms_refuse_mismatched_shapes_and_empty_input():
    with pytest.raises(ValueError, match="shape"):
        coordinate_median([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="zero updates"):
        coordinate_median([])
    with pytest.raises(TypeError, match="floating"):
        krum_scores(torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("n,f", [(3, 0), (5, 1), (8, 2), (12, 3), (2, 0)])
def test_krum_scores_equal_numpy(n, f):
    a = np.random.default_rng(n + f).normal(size=(n, 4, 3))
    got = krum_scores(torch.from_numpy(a), f)
    np.testing.assert_allclose(got.numpy(), _np_krum_scores(a, f), rtol=1e-9)


def test_pairwise_distances_in_chunks_equal_numpy():
    a = np.random.default_rng(0).normal(size=(6, 1000))
    got = pairwise_sq_distances(torch.from_numpy(a), chunk=77)
    want = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_krum_selects_the_honest_cluster_and_refuses_bad_counts():
    honest = torch.randn(7, 10, generator=torch.Generator().manual_seed(0)) * 0.1
    evil = torch.full((3, 10), 5.0)
    x = torch.cat([evil, honest])
    assert krum_select(x, num_malicious=3)[0] >= 3
    assert all(i >= 3 for i in krum_select(x, 3, num_selected=5))
    with pytest.raises(ValueError, match="num_selected"):
        krum_select(x, 3, num_selected=11)
    assert krum_select(torch.ones(1, 3)) == [0]
    assert krum_scores(torch.ones(1, 3)).tolist() == [0.0]


def _weighted_median_1d(values, weights):
    order = np.argsort(values)
    cw = np.cumsum(np.asarray(weights)[order]) / np.sum(weights)
    return values[order][np.searchsorted(cw, 0.5)]


def test_geometric_median_satisfies_the_optimality_condition():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(9, 5))
    w = rng.uniform(1, 5, size=9)
    v = geometric_median(torch.from_numpy(z), w, nu=1e-12, max_iter=2000, tol=1e-15).numpy()
    diff = v - z
    grad = (w[:, None] * diff / np.linalg.norm(diff, axis=1, keepdims=True)).sum(0)
    assert np.linalg.norm(grad) < 1e-5 * w.sum()


def test_geometric_median_in_one_dimension_is_the_weighted_median():
    z = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    w = [1.0, 1.0, 3.0, 1.0, 1.0]
    v = geometric_median(torch.from_numpy(z), w, nu=1e-10, max_iter=500, tol=1e-14)
    assert v.item() == pytest.approx(_weighted_median_1d(z[:, 0], w), abs=1e-4)


def test_geometric_median_resists_a_far_outlier_where_the_mean_does_not():
    x = torch.cat([torch.zeros(4, 3), torch.full((1, 3), 1e6)])
    assert torch.linalg.vector_norm(geometric_median(x)) < 1e-2
    assert x.mean(0).norm() > 1e5


def test_centered_clip_equals_a_numpy_iteration():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)) * np.array([[1], [1], [1], [1], [20], [30]])
    v = np.zeros(4)
    for _ in range(3):
        d = x - v
        norms = np.linalg.norm(d, axis=1)
        v = v + (d * np.minimum(1, 2.0 / norms)[:, None]).mean(0)
    got = centered_clip(torch.from_numpy(x), 2.0, iterations=3)
    np.testing.assert_allclose(got.numpy(), v, rtol=1e-10)


def test_norm_bounded_mean_equals_numpy():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    w = [1.0, 2.0, 1.0]
    clipped = np.array([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]])
    want = (clipped * np.array(w)[:, None]).sum(0) / sum(w)
    np.testing.assert_allclose(norm_bounded_mean(torch.from_numpy(x), 1.0, w).numpy(), want)
    with pytest.raises(ValueError, match="weights"):
        norm_bounded_mean(torch.from_numpy(x), 1.0, [1.0, 2.0])


def test_inverse_loss_weights_hand_the_average_to_a_client_claiming_zero_loss():
    w = inverse_loss_weights([2.0, 1.0, 1.0])
    np.testing.assert_allclose(w.numpy(), [0.2, 0.4, 0.4])
    liar = inverse_loss_weights([2.3, 2.1, 2.2, 1e-9])
    assert liar[3] > 0.999


# ---- the Aggregator classes on state dicts -------------------------------------------------------


def _global():
    return {
        "w": torch.zeros(3, 2),
        "b": torch.zeros(2, dtype=torch.float64),
        "steps": torch.tensor(10, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }


def _replies(deltas, steps=None, flags=None, counts=None):
    g = _global()
    out = []
    for i, d in enumerate(deltas):
        d = torch.as_tensor(d, dtype=torch.float64)
        state = {
            "w": (g["w"] + d[:6].reshape(3, 2)).float(),
            "b": g["b"] + d[6:],
            "steps": torch.tensor(steps[i] if steps else 10 + i, dtype=torch.int64),
            "flag": torch.tensor(flags[i] if flags else [True, False]),
        }
        out.append(FitReply(state, float(counts[i] if counts else 10), {"loss": 1.0}, i))
    return out


def _flat(state):
    return torch.cat([state["w"].double().reshape(-1), state["b"].reshape(-1)])


def test_median_aggregator_on_states_matches_numpy_and_keeps_dtypes():
    d = np.random.default_rng(0).normal(size=(4, 8))
    new = Median().aggregate(_global(), _replies(d, steps=[10, 11, 12, 15]))
    np.testing.assert_allclose(_flat(new).numpy(), np.median(d, 0), rtol=1e-6, atol=1e-7)
    assert new["w"].dtype == torch.float32 and new["b"].dtype == torch.float64
    assert new["steps"].item() == 12  # median of 10, 11, 12, 15 = 11.5 -> 12 (half to even)


def test_boolean_buffers_take_the_majority_and_ties_keep_the_global_value():
    d = np.zeros((4, 8))
    flags = [[False, True], [False, True], [True, True], [True, False]]
    new = TrimmedMean(0.0).aggregate(_global(), _replies(d, flags=flags))
    assert new["flag"].tolist() == [True, True]  # tie -> global's True; 3 of 4 -> True


def test_trimmed_mean_aggregator_matches_numpy():
    d = np.random.default_rng(1).normal(size=(10, 8))
    new = TrimmedMean(0.2).aggregate(_global(), _replies(d))
    np.testing.assert_allclose(_flat(new).numpy(), _np_trim_mean(d, 0.2), rtol=1e-5, atol=1e-6)
    assert TrimmedMean(0.2).config() == {"name": "TrimmedMean", "beta": 0.2}


def test_multikrum_averages_its_selection_by_sample_count():
    rng = np.random.default_rng(2)
    d = np.concatenate([rng.normal(size=(6, 8)) * 0.1, np.full((2, 8), 50.0)])
    counts = [1, 2, 3, 4, 5, 6, 100, 100]
    agg = MultiKrum(num_malicious=2, num_selected=3)
    new = agg.aggregate(_global(), _replies(d, counts=counts))
    chosen = [int(i) for i in np.argsort(_np_krum_scores(d, 2), kind="stable")[:3]]
    assert agg.last_selected == chosen and max(chosen) < 6
    w = np.array([counts[i] for i in chosen], dtype=float)
    want = (d[chosen] * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(_flat(new).numpy(), want, rtol=1e-5, atol=1e-6)
    one = Krum(num_malicious=2).aggregate(_global(), _replies(d, counts=counts))
    np.testing.assert_allclose(_flat(one).numpy(), d[chosen[0]], rtol=1e-5, atol=1e-6)


def test_aggregators_with_one_client_return_its_state():
    d = np.random.default_rng(4).normal(size=(1, 8))
    for agg in (Median(), TrimmedMean(0.3), Krum(1), GeometricMedian(), NormBounding(1e9)):
        new = agg.aggregate(_global(), _replies(d))
        np.testing.assert_allclose(_flat(new).numpy(), d[0], rtol=1e-5, atol=1e-6)


def test_robust_aggregators_resist_one_huge_update_where_the_mean_does_not():
    rng = np.random.default_rng(5)
    d = np.concatenate([rng.normal(size=(6, 8)) * 0.01, np.full((1, 8), 1e4)])
    for agg in (Median(), TrimmedMean(0.2), Krum(1), GeometricMedian(), CenteredClipping(0.1)):
        new = agg.aggregate(_global(), _replies(d))
        assert _flat(new).abs().max() < 1.0, agg


def test_inverse_loss_aggregator_is_taken_over_by_a_near_zero_loss():
    d = np.concatenate([np.zeros((3, 8)), np.full((1, 8), 7.0)])
    replies = _replies(d)
    replies[3].metrics["loss"] = 1e-9
    agg = InverseLossWeighting()
    new = agg.aggregate(_global(), replies)
    assert _flat(new).min() > 6.99
    assert agg.last_weights[3] > 0.999
    del replies[0].metrics["loss"]
    with pytest.raises(ValueError, match="loss"):
        agg.aggregate(_global(), replies)


def test_aggregator_refuses_mismatched_shapes():
    replies = _replies(np.zeros((2, 8)))
    replies[1].state["w"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        Median().aggregate(_global(), replies)


def test_stateless_aggregators_refuse_state_to_load():
    with pytest.raises(ValueError):
        Median().load_state_dict({"x": torch.zeros(1)})
    assert math.isclose(GeometricMedian().config()["nu"], 1e-6)


def test_client_drift_equals_numpy_and_the_meter_passes_through():
    from labsupport.fl.aggregators import WeightedMean
    from labsupport.fl.robust import DriftMeter, client_drift

    d = np.random.default_rng(6).normal(size=(5, 8))
    got = client_drift(torch.from_numpy(d))
    mean = d.mean(0)
    spread = np.sqrt(((d - mean) ** 2).sum(1).mean())
    assert got["spread"] == pytest.approx(spread)
    assert got["relative"] == pytest.approx(spread / np.linalg.norm(mean))
    meter = DriftMeter(WeightedMean())
    a = meter.aggregate(_global(), _replies(d))
    b = WeightedMean().aggregate(_global(), _replies(d))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(meter.drift) == 1 and meter.config() == {"name": "WeightedMean"}


def test_adaptive_radius_is_the_median_norm_and_ignores_a_huge_minority():
    from labsupport.fl.robust import median_norm

    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [1e9, 0.0], [1e9, 0.0]])
    assert median_norm(x) == pytest.approx(5.0)  # norms 5, 1, 2, 1e9, 1e9: the median is 5
    d = np.concatenate([np.full((4, 8), 0.1), np.full((2, 8), 1e6)])
    for agg in (CenteredClipping(), NormBounding()):
        new = agg.aggregate(_global(), _replies(d))
        assert _flat(new).abs().max() < 1.0, agg


def test_server_with_a_robust_aggregator_resists_attackers_the_mean_does_not():
    from labsupport.fl.attacks import make_attackers
    from labsupport.fl.clients import DataClient
    from labsupport.fl.server import FedAvgConfig, FedAvgSimulation

    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(6, 3, generator=gen)
    clients = []
    for _ in range(10):
        x = torch.randn(30, 6, generator=gen)
        clients.append(DataClient(x, (x @ w_true).argmax(1)))
    clients, bad = make_attackers(clients, "sign_flip", 0.3, seed=0)
    test = (torch.randn(200, 6, generator=gen),)
    test = (test[0], (test[0] @ w_true).argmax(1))
    cfg = FedAvgConfig(num_rounds=4, fraction_train=1.0, batch_size=10, lr=0.2)
    acc = {}
    for name, agg in (("mean", None), ("median", Median()), ("krum", Krum(len(bad)))):
        torch.manual_seed(0)
        sim = FedAvgSimulation(torch.nn.Linear(6, 3), clients, test, cfg, aggregator=agg)
        sim.run(progress=False)
        assert all(not r.rejected for r in sim.history.rounds)
        acc[name] = sim.history.final_accuracy
    assert acc["median"] > acc["mean"] + 0.2 and acc["krum"] > acc["mean"] + 0.2, acc
