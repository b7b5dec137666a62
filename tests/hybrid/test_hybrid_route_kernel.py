"""The compiled offload decision (labsupport.hybrid.route_kernel) against torch's float64 softmax.

Random batches check the common case; rows built a hair either side of each bound the kernel uses
(test 1's two log-gaps, test 2's two sums) check that no bound is off, since a wrong one decides
exactly those rows wrongly and leaves random rows alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labsupport.hybrid.route_kernel import offload_rows
from labsupport.hybrid.routing import FastRouter, route


def reference(z: np.ndarray, temperature: float, threshold: float) -> np.ndarray:
    p = torch.softmax(torch.from_numpy(np.asarray(z, dtype=np.float64)) / temperature, 1)
    return (p.max(1).values < threshold).numpy()


@pytest.mark.parametrize("c", [2, 3, 10, 100])
@pytest.mark.parametrize(("t", "thr"), [(1.0, 0.6), (2.4, 0.78), (0.5, 0.3), (3.0, 0.97)])
def test_random_batches_match_the_float64_softmax(c, t, thr):
    rng = np.random.default_rng(c)
    for scale in (0.3, 2.0, 8.0):
        z = (rng.normal(size=(513, c)) * scale).astype(np.float32)
        got = FastRouter(t, thr)(z)
        assert got.dtype == bool and got.shape == (513,)
        np.testing.assert_array_equal(got, reference(z, t, thr))


def _row(gaps: list[float], c: int, t: float) -> np.ndarray:
    """Logits ``0, t*gaps[0], t*gaps[1], ...`` padded with -30 (far below the rest) to ``c``."""
    z = np.full(c, -30.0 * t)
    z[0] = 0.0
    z[1 : 1 + len(gaps)] = np.asarray(gaps) * t
    return z


@pytest.mark.parametrize("c", [3, 10])
def test_rows_either_side_of_every_bound(c):
    t, thr = 1.7, 0.78
    e = 1 / thr - 1  # the row offloads when sum_{k>1} exp(d_k) > e
    lo, hi = math.log(e / (c - 1)), math.log(e)
    rows, wanted = [], []
    for eps in (-1e-5, 1e-5):
        d = lo + eps  # test 1, lower bound: all tail terms equal, so the tail is (C-1) exp(d)
        rows.append(_row([d] * (c - 1), c, t))
        wanted.append(eps > 0)
        d = hi + eps  # test 1, upper bound: a single tail term
        rows.append(_row([d], c, t))
        wanted.append(eps > 0)
        # test 2: exp(d2) + exp(d3) straddles e, the other tail terms are tiny
        d2 = math.log(e * 0.6)
        d3 = math.log(e * 0.4 * (1 + eps))
        rows.append(_row([d2, d3], c, t))
        wanted.append(eps > 0)
        # test 2's upper sum exp(d2) + (C-2) exp(d3) straddles e: every tail term past z2 equal
        d2 = math.log(e * 0.5)
        d3 = math.log(e * 0.5 / (c - 2) * (1 + eps))
        rows.append(_row([d2] + [d3] * (c - 2), c, t))
        wanted.append(eps > 0)
    z = np.stack(rows)
    np.testing.assert_array_equal(reference(z, t, thr), wanted)  # the rows are what they claim
    for dtype in (np.float64, np.float32):
        np.testing.assert_array_equal(FastRouter(t, thr)(z.astype(dtype)), wanted)


def test_a_confidence_equal_to_the_threshold_stays_on_the_edge():
    assert FastRouter(1.0, 0.5)(np.zeros((1, 2), np.float32)).tolist() == [False]
    assert FastRouter(1.0, 0.25)(np.zeros((1, 4), np.float32)).tolist() == [False]
    assert FastRouter(1.0, 0.2501)(np.zeros((1, 4), np.float32)).tolist() == [True]


def test_one_class_and_thresholds_at_or_above_one():
    one = np.array([[3.0], [-2.0]], np.float32)  # one class: max softmax is exactly 1
    assert FastRouter(1.0, 0.5)(one).tolist() == [False, False]
    assert FastRouter(1.0, 1.0)(one).tolist() == [False, False]  # a tie stays
    assert FastRouter(1.0, 1.5)(one).tolist() == [True, True]
    z = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    assert FastRouter(2.0, 1.0)(z).all() and FastRouter(2.0, 3.0)(z).all()


def test_nan_and_infinite_logits():
    inf = np.inf
    z = np.array(
        [
            [0.0, np.nan, 1.0],
            [10.0, np.nan, 0.0],  # confident but for the NaN
            [np.nan, 10.0, 0.0],
            [inf, 0.0, 0.0],
            [-inf, -inf, -inf],
            [5.0, -inf, -inf],
            [0.0, 0.0, -inf],
        ],
        np.float32,
    )
    # a NaN, an infinite top logit, all -inf: nothing to trust, offload. A -inf elsewhere is a zero
    # probability: [5, -inf, -inf] is certain, [0, 0, -inf] is a coin toss.
    wanted = [True, True, True, True, True, False, True]
    assert FastRouter(1.0, 0.9)(z).tolist() == wanted
    with np.errstate(invalid="ignore"):
        _, numpy_mask = FastRouter(1.0, 0.9).decide(z, z.argmax(1))
    assert numpy_mask.tolist() == wanted
    assert route(torch.tensor([0.2, float("nan"), 0.95]), 0.9).tolist() == [True, True, False]


def test_layouts_dtypes_and_shapes():
    rng = np.random.default_rng(3)
    z = np.asfortranarray((rng.normal(size=(40, 10)) * 3).astype(np.float32))
    ref = reference(z, 1.5, 0.7)
    np.testing.assert_array_equal(FastRouter(1.5, 0.7)(z), ref)  # not C-contiguous
    np.testing.assert_array_equal(FastRouter(1.5, 0.7)(z.astype(np.float64)), ref)
    ints = rng.integers(-5, 5, size=(30, 4))
    np.testing.assert_array_equal(FastRouter(1.5, 0.7)(ints), reference(ints, 1.5, 0.7))
    assert FastRouter(1.0, 0.5)(np.zeros((0, 10), np.float32)).shape == (0,)
    for bad in (np.zeros(10, np.float32), torch.zeros(2, 10), [[0.0, 1.0]]):
        with pytest.raises(ValueError, match=r"\(N, C\) numpy array"):
            FastRouter(1.0, 0.5)(bad)


def test_the_kernel_and_the_numpy_path_agree_on_a_large_batch():
    z = (np.random.default_rng(7).normal(size=(5000, 10)) * 4).astype(np.float32)
    router = FastRouter(2.2, 0.8)
    _, mask = router.decide(z, z.argmax(1))
    np.testing.assert_array_equal(offload_rows(z, 1 / 2.2, 1 / 0.8), mask)
    np.testing.assert_array_equal(router(z), mask)
    assert 0.05 < mask.mean() < 0.95  # both sides of the threshold are exercised


def test_rows_decided_by_the_gap_alone_are_decided_right():
    from labsupport.hybrid.route_kernel import decided_by_gap, gap_bounds

    z = (np.random.default_rng(11).normal(size=(3000, 10)) * 3).astype(np.float32)
    t, thr = 1.8, 0.7
    settled = decided_by_gap(z, t, thr)
    assert 0.3 < settled.mean() < 1.0  # test 1 settles many rows, not all
    top2 = np.sort(z.astype(np.float64), axis=1)[:, -2:]
    d2 = (top2[:, 0] - top2[:, 1]) / t
    _, hi = gap_bounds(10, 1 / thr)
    # a settled row goes to the cloud exactly when its gap is above hi, as the softmax says
    np.testing.assert_array_equal((d2 > hi)[settled], reference(z, t, thr)[settled])
    # and the settled rows are those whose tail bounds (C-1) e^d2 and e^d2 already fall on one side
    e = 1 / thr - 1
    provable = (9 * np.exp(d2) <= e) | (np.exp(d2) > e)
    np.testing.assert_array_equal(settled, provable)
    assert not decided_by_gap(np.zeros((4, 1)), 1.0, 0.5).any()
    assert not decided_by_gap(z, t, 1.0).any()  # t >= 1: the gap settles nothing
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        decided_by_gap(np.zeros(5), 1.0, 0.5)
