"""The offload decision as one compiled loop over the batch (chapter 05, section 3; numba).

:class:`~labsupport.hybrid.routing.FastRouter` offloads row ``i`` when its calibrated max softmax is
below the threshold ``t``: ``p_max = 1 / s`` with ``s = sum_c exp((z_c - z_1) / T)`` and ``z_1`` the
row's largest logit, so the row goes to the cloud when ``s - 1 > 1/t - 1 =: e`` (the *excess*).
At batch 256 the numpy version of that formula spends most of its time in the fixed cost of its
five calls, and ``exp`` runs on every logit. This kernel is one call, and it skips ``exp`` for most
rows with two bounds on ``s - 1``. Sort a row's logits ``z_1 >= z_2 >= z_3 >= ...`` and let
``d_k = (z_k - z_1) / T <= 0``:

1. ``exp(d_2) <= s - 1 <= (C - 1) exp(d_2)``: the second term is one of the ``C - 1`` and the
   largest. So ``d_2 <= log(e / (C - 1))`` keeps the row on the edge, ``d_2 > log(e)`` offloads
   it: a comparison of the top-2 gap with two numbers fixed per call, no ``exp`` at all.
2. ``exp(d_2) + exp(d_3) <= s - 1 <= exp(d_2) + (C - 2) exp(d_3)``: two ``exp`` for the rows the
   first test leaves open.
3. The rows still open sum all ``C`` terms (float64).

The loop makes two passes. The first finds every row's top two logits with a min/max network (no
branches, so the CPU never mispredicts one) and applies test 1; the second visits only the rows
test 1 left open. :func:`decided_by_gap` says which rows test 1 settles (notebook 05 prints the
share).

Each test keeps a relative margin of ``1e-9``, so a row near the threshold always takes the exact
sum: the decision is the float64 formula's, and a tie (``p_max == t``) stays on the edge. A row with
a NaN, or whose largest logit is infinite, is offloaded (its edge answer means nothing). The bounds
are the usual ones for log-sum-exp (e.g. Boyd & Vandenberghe, *Convex Optimization*, 2004,
section 3.1.5): ``z_1 <= logsumexp(z) <= z_1 + log C``, applied to the tail.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["decided_by_gap", "gap_bounds", "offload_rows"]

_MARGIN = 1e-9


@numba.njit(cache=True)
def gap_bounds(c: int, bound: float) -> tuple[float, float]:
    """Test 1's thresholds ``(lo, hi)`` on ``d_2`` for ``c`` classes and ``bound = 1/t``: the row
    stays on the edge when ``d_2 <= lo`` and goes to the cloud when ``d_2 > hi``, margins included.
    ``(nan, nan)`` when test 1 cannot decide anything (one class, or ``t >= 1``)."""
    excess = bound - 1.0
    if c > 1 and excess > 0.0:
        return math.log(excess / (c - 1)) - _MARGIN, math.log(excess) + _MARGIN
    return np.nan, np.nan


def decided_by_gap(z: np.ndarray, temperature: float, threshold: float) -> np.ndarray:
    """Which rows of ``z`` (``(N, C)`` logits) test 1 settles from their top-2 gap alone, in numpy,
    for reading (the kernel does the same inside its first pass)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    if z.shape[1] < 2:
        return np.zeros(len(z), dtype=bool)
    top2 = np.sort(z, axis=1)[:, -2:]
    d2 = (top2[:, 0] - top2[:, 1]) / temperature
    lo, hi = gap_bounds(z.shape[1], 1.0 / threshold)
    return (d2 <= lo) | (d2 > hi)


@numba.njit(cache=True, nogil=True)
def offload_rows(z: np.ndarray, inv_t: float, bound: float) -> np.ndarray:
    """``max softmax(z / T) < 1 / bound`` per row of ``z`` (``(N, C)``) as an ``(N,)`` bool array;
    ``inv_t = 1/T``, ``bound = 1/t``."""
    n, c = z.shape
    out = np.empty(n, np.bool_)
    excess = bound - 1.0
    lo, hi = gap_bounds(c, bound)  # NaN bounds leave every row open
    above, below = excess + abs(excess) * _MARGIN, excess - abs(excess) * _MARGIN
    open_rows = np.empty(n, np.int64)
    k = 0
    # Pass 1, every row, without branches (so the CPU never guesses wrong): the top two logits by a
    # min/max network, then test 1. The rows it leaves open are listed in open_rows[:k].
    for i in range(n):
        z1 = z2 = -np.inf
        nan = False
        for j in range(c):
            v = z[i, j]
            nan |= v != v
            z2 = max(z2, min(z1, v))
            z1 = max(z1, v)
        bad = nan | (z1 == np.inf) | (z1 == -np.inf)
        d2 = (z2 - z1) * inv_t
        out[i] = bad | (d2 > hi)
        open_rows[k] = i
        k += (not bad) & (not d2 <= lo) & (not d2 > hi)
    # Pass 2, the open rows only: the top three, test 2, then the exact sum.
    for r in range(k):
        i = open_rows[r]
        z1 = z2 = z3 = -np.inf
        for j in range(c):
            v = np.float64(z[i, j])
            low = min(z1, v)
            z1 = max(z1, v)
            z3 = max(z3, min(z2, low))
            z2 = max(z2, low)
        a, b = math.exp((z2 - z1) * inv_t), math.exp((z3 - z1) * inv_t)
        if a + b > above:
            out[i] = True
        elif a + max(c - 2, 0) * b < below:
            out[i] = False
        else:
            s = 0.0
            for j in range(c):
                s += math.exp((np.float64(z[i, j]) - z1) * inv_t)
            out[i] = not s <= bound
    return out
