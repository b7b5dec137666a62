"""Confidence scores, routing decisions and threshold choice (labsupport.hybrid.routing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labsupport.hybrid.routing import (
    FastRouter,
    choose_threshold,
    hybrid_predictions,
    margin,
    max_softmax,
    naive_route,
    neg_entropy,
    offload_mask,
    route,
    tradeoff_curve,
)


def test_scores_against_hand_computed_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert max_softmax(p).tolist() == pytest.approx([0.7, 1 / 3])
    assert margin(p).tolist() == pytest.approx([0.5, 0.0])
    h0 = 0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)
    assert neg_entropy(p).tolist() == pytest.approx([h0, -math.log(3)])
    assert neg_entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0  # 0 log 0 = 0, no NaN


def test_route_offloads_below_threshold_and_keeps_ties_on_the_edge():
    conf = torch.tensor([0.2, 0.5, 0.5000001, 0.9, 0.49])
    assert route(conf, 0.5).tolist() == [True, False, False, False, True]
    assert route(conf, 0.0).tolist() == [False] * 5
    assert route(conf, 1.0).tolist() == [True] * 5
    with pytest.raises(ValueError):
        route(conf.reshape(5, 1), 0.5)
    with pytest.raises(ValueError):
        route(conf, float("nan"))


def test_hybrid_predictions_merge_by_mask():
    edge, cloud = torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9])
    assert hybrid_predictions(edge, cloud, torch.tensor([True, False, True])).tolist() == [7, 2, 9]
    with pytest.raises(TypeError):
        hybrid_predictions(edge, cloud, torch.tensor([1, 0, 1]))


def _brute_force(conf, edge_ok, cloud_ok):
    out = {}
    for t in [*sorted(set(conf.tolist())), np.inf]:
        off = conf < t
        out[round(off.mean(), 9)] = np.where(off, cloud_ok, edge_ok).mean()
    return out


def test_tradeoff_curve_matches_a_brute_force_sweep_with_ties():
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 20, 300) / 20  # many ties
    edge_ok, cloud_ok = rng.random(300) < 0.7, rng.random(300) < 0.9
    curve = tradeoff_curve(conf, edge_ok, cloud_ok)
    ref = _brute_force(conf, edge_ok, cloud_ok)
    got = dict(zip(np.round(curve["offload"], 9), curve["accuracy"], strict=True))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k])
    for t, off in zip(curve["threshold"], curve["offload"], strict=True):
        assert (conf < t).mean() == pytest.approx(off)  # each threshold gives its offload


def test_choose_threshold_hand_worked():
    # sorted by confidence: edge wrong on the two least confident, cloud right on all but #3
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    edge_ok = np.array([False, False, True, True, True])
    cloud_ok = np.array([True, True, False, True, True])
    # offload 0: 3/5; 1: 4/5; 2: 5/5 = cloud 4/5 + ... -> first k with acc >= cloud (0.8) is k = 1
    ch = choose_threshold(conf, edge_ok, cloud_ok, target="cloud_gap", gap=0.0)
    assert (ch.offload, ch.accuracy, ch.threshold, ch.met) == (0.2, 0.8, 0.2, True)
    assert ch.cloud_accuracy == 0.8 and ch.edge_accuracy == 0.6
    ch2 = choose_threshold(conf, edge_ok, cloud_ok, target="max_offload", max_offload=0.5)
    assert (ch2.offload, ch2.accuracy) == (0.4, 1.0)
    ch3 = choose_threshold(conf, edge_ok, cloud_ok, target="max_offload", max_offload=0.0)
    assert (ch3.offload, ch3.threshold) == (0.0, 0.1)
    with pytest.raises(ValueError, match="target"):
        choose_threshold(conf, edge_ok, cloud_ok, target="best")


def test_naive_route_fails_on_a_batch_and_tracks_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    with pytest.raises(RuntimeError):
        naive_route(model, torch.randn(8, 4), 0.5)
    assert model.training  # it never called eval(): dropout is active
    assert naive_route(model, torch.randn(1, 4), 2.0) == "cloud"


def test_fused_offload_mask_equals_route_of_calibrated_max_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=g) * 4
    for t, thr in ((1.0, 0.6), (2.5, 0.9), (0.5, 0.3)):
        ref = route(max_softmax(torch.softmax(logits.double() / t, 1)), thr)
        assert torch.equal(offload_mask(logits, t, thr), ref)
    big = torch.tensor([[1000.0, 0.0], [0.0, 0.0]])  # no overflow from large logits
    assert offload_mask(big, 1.0, 0.75).tolist() == [False, True]
    with pytest.raises(ValueError):
        offload_mask(logits, 0.0, 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_router_equals_the_textbook_softmax_route_in_float64(dtype):
    rng = np.random.default_rng(1)
    for n in (1, 7, 256):  # the router caches per batch shape: change it between calls
        z = (rng.normal(size=(n, 10)) * 4).astype(dtype)
        for t, thr in ((1.0, 0.6), (2.4, 0.9), (0.5, 0.3), (3.0, 1.5)):
            router = FastRouter(t, thr)
            p = torch.softmax(torch.from_numpy(z.astype(np.float64)) / t, 1)
            ref_conf = p.max(1).values.numpy()
            off = router(z, z.argmax(1))
            assert off.dtype == bool and off.shape == (n,)
            np.testing.assert_array_equal(off, ref_conf < thr)
            conf, off2 = router.decide(z, z.argmax(1))
            np.testing.assert_allclose(conf, ref_conf, rtol=1e-5)
            np.testing.assert_array_equal(off2, off)


def test_fast_router_survives_huge_logits_and_non_contiguous_input():
    big = np.array([[1000.0, 0.0], [0.0, 0.0], [-1e4, -1e4 + 1.0]], dtype=np.float32)
    router = FastRouter(1.0, 0.75)
    assert router(big, big.argmax(1)).tolist() == [False, True, True]  # no inf/NaN from exp
    z = np.asfortranarray(np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32))
    ref = FastRouter(2.0, 0.5)(np.ascontiguousarray(z), z.argmax(1))
    np.testing.assert_array_equal(FastRouter(2.0, 0.5)(z, z.argmax(1)), ref)


@pytest.mark.parametrize(
    "bad", [(0.0, 0.5), (-1.0, 0.5), (1.0, 0.0), (float("nan"), 0.5), (1.0, float("inf"))]
)
def test_fast_router_rejects_bad_temperature_or_threshold(bad):
    with pytest.raises(ValueError):
        FastRouter(*bad)


def _bound_brute_force(conf, edge_ok, cloud_ok, gap, z):
    """Walk the thresholds in increasing order; the first whose loss bound is within gap."""
    n = len(conf)
    for t in [*sorted(set(conf.tolist())), np.inf]:
        kept = conf >= t
        d = np.where(kept, cloud_ok.astype(float) - edge_ok, 0.0)
        if d.mean() + z * d.std() / np.sqrt(n) <= gap + 1e-12:
            return t, (~kept).mean()
    raise AssertionError("offloading everything has zero loss")


def test_choose_threshold_with_a_confidence_level_matches_a_brute_force_bound():
    from statistics import NormalDist

    rng = np.random.default_rng(3)
    conf = rng.integers(0, 50, 400) / 50  # ties included
    edge_ok = rng.random(400) < 0.4 + 0.6 * conf  # right more often when confident
    cloud_ok = rng.random(400) < 0.9
    for level in (0.5, 0.9, 0.99):
        ch = choose_threshold(conf, edge_ok, cloud_ok, gap=0.01, level=level)
        t, off = _bound_brute_force(conf, edge_ok, cloud_ok, 0.01, NormalDist().inv_cdf(level))
        assert (ch.threshold, ch.offload) == (pytest.approx(t), pytest.approx(off))
        assert ch.met
    plain = choose_threshold(conf, edge_ok, cloud_ok, gap=0.01)
    at_half = choose_threshold(conf, edge_ok, cloud_ok, gap=0.01, level=0.5)  # z = 0
    strict = choose_threshold(conf, edge_ok, cloud_ok, gap=0.01, level=0.99)
    assert at_half == plain and strict.offload > plain.offload


def test_choose_threshold_level_is_refused_where_it_means_nothing():
    conf, ok = np.array([0.1, 0.9]), np.array([True, True])
    with pytest.raises(ValueError, match="level"):
        choose_threshold(conf, ok, ok, level=1.0)
    with pytest.raises(ValueError, match="level"):
        choose_threshold(conf, ok, ok, level=0.3)
    with pytest.raises(ValueError, match="cloud_gap"):
        choose_threshold(conf, ok, ok, target="max_offload", level=0.95)
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold(np.array([0.1, np.nan]), ok, ok)
