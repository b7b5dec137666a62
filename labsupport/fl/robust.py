"""Robust aggregation: the server's answer to clients that send wrong updates on purpose.

FedAvg's weighted mean (:class:`~labsupport.fl.aggregators.WeightedMean`) can be moved anywhere by a
single client. The aggregators here bound what a minority of clients can do; chapter 03 runs each of
them against the attacks of :mod:`labsupport.fl.attacks` (notebook ``03_non_iid``, benchmark
``robust_attacks``). Each comes twice: a *function form* over a stacked tensor ``(n, ...)`` of ``n``
client vectors (what the tests check against numpy and Flower), and an
:class:`~labsupport.fl.aggregators.Aggregator` that applies it to a round's replies.

* :func:`coordinate_median` / :class:`Median` -- coordinate-wise median (Yin et al., "Byzantine-robust
  distributed learning: towards optimal statistical rates", ICML 2018). **Unweighted**, and for an even
  number of clients the **mean of the two middle values** (``np.median``; Flower's ``FedMedian``).
* :func:`trimmed_mean` / :class:`TrimmedMean` -- coordinate-wise ``beta``-trimmed mean (Yin et al. 2018):
  drop the ``k = int(beta * n)`` smallest and ``k`` largest values of every coordinate, average the rest,
  unweighted (Flower's ``FedTrimmedAvg``). ``beta`` in ``[0, 0.5)``; ``k = 0`` is the plain mean.
* :func:`krum_scores`, :func:`krum_select` / :class:`Krum`, :class:`MultiKrum` -- Blanchard et al.,
  "Machine learning with adversaries: Byzantine tolerant gradient descent" (NeurIPS 2017): the score of
  update ``i`` is ``sum_{j in N_i} ||V_i - V_j||^2`` over its ``max(1, n - f - 2)`` nearest other
  updates (Flower's choice of ``max(1, .)``); Krum returns the lowest-scoring update, Multi-Krum the
  sample-weighted mean of the ``m`` lowest.
* :func:`geometric_median` / :class:`GeometricMedian` -- RFA (Pillutla, Kakade & Harchaoui, "Robust
  aggregation for federated learning", IEEE TSP 2022), Algorithm 2: the smoothed Weiszfeld iteration
  ``v <- sum_i b_i z_i / sum_i b_i``, ``b_i = a_i / max(nu, ||v - z_i||)``, ``a_i`` the sample shares.
* :func:`centered_clip` / :class:`CenteredClipping` -- Karimireddy, He & Jaggi, "Learning from history
  for Byzantine robust optimization" (ICML 2021), eq. (CC):
  ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)``, started at ``v = 0`` (no update).
* :func:`norm_bounded_mean` / :class:`NormBounding` -- Sun et al., "Can you really backdoor federated
  learning?" (2019): clip each update to L2 norm ``max_norm``, then the sample-weighted mean.
* :func:`inverse_loss_weights` / :class:`InverseLossWeighting` -- the *naive* "adaptive" weighting of
  common teaching code, ``w_k ∝ 1 / loss_k`` from the client's own ``metrics["loss"]``. Implemented so
  that chapter 03 can show it exploited: one client reporting a loss near zero takes the whole average
  (:func:`labsupport.fl.attacks` has the liar). It is not a robust aggregator.

What the aggregators work on, and what they do with each kind of entry:

* **floating entries as deltas** ``state_k - global`` (flattened into one vector per client), so that
  distances (Krum, geometric median, clipping) measure the *update*; the new global is
  ``global + aggregate(deltas)``. The median and trimmed mean are translation-equivariant, so this only
  changes rounding.
* **integer and boolean buffers** (``num_batches_tracked``) take the exact coordinate-wise median of the
  clients' values (the middle pair rounded half to even; booleans: the majority, ties keep the global's
  value), so a minority cannot set them either. Krum and Multi-Krum take them from the selected
  client(s) through :func:`~labsupport.fl.state.aggregate` (exact weighted mean).
* **NaN/inf**: the server validates replies before any aggregator sees them; the function forms
  refuse non-finite input with a ``ValueError`` themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch

from .aggregators import Aggregator
from .clients import FitReply
from .state import StateDict, aggregate, normalized_weights

__all__ = [
    "CenteredClipping",
    "DriftMeter",
    "GeometricMedian",
    "InverseLossWeighting",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBounding",
    "TrimmedMean",
    "centered_clip",
    "client_drift",
    "coordinate_median",
    "flatten_deltas",
    "geometric_median",
    "inverse_loss_weights",
    "krum_scores",
    "krum_select",
    "median_norm",
    "norm_bounded_mean",
    "num_trimmed",
    "pairwise_sq_distances",
    "stack_updates",
    "trimmed_mean",
    "unflatten_delta",
]

TensorsLike = torch.Tensor | Sequence[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Input checks of the function forms
# ----------------------------------------------------------------------------------------------


def stack_updates(updates: TensorsLike, *, allow_integer: bool = False) -> torch.Tensor:
    """``updates`` as one ``(n, ...)`` tensor, with every client's tensor checked.

    Accepts a stacked tensor or a sequence of same-shaped tensors. Raises ``ValueError`` for no
    clients, mismatched shapes, or non-finite values, ``TypeError`` for non-tensors and (unless
    ``allow_integer``) integer input.
    """
    if isinstance(updates, torch.Tensor):
        if updates.ndim < 1:
            raise ValueError(
                f"updates must have a client dimension (shape (n, ...)), got shape {tuple(updates.shape)}"
            )
        stacked = updates
    else:
        items = list(updates)
        for i, u in enumerate(items):
            if not isinstance(u, torch.Tensor):
                raise TypeError(f"update {i} is a {type(u).__name__}; expected a torch.Tensor")
            if u.shape != items[0].shape:
                raise ValueError(
                    f"update {i} has shape {tuple(u.shape)}; update 0 has {tuple(items[0].shape)}: "
                    "every client must send the same shapes"
                )
            if u.dtype != items[0].dtype:
                raise ValueError(f"update {i} has dtype {u.dtype}; update 0 has {items[0].dtype}")
        if not items:
            raise ValueError("cannot aggregate zero updates: no client replied")
        stacked = torch.stack([u.detach() for u in items])
    if len(stacked) == 0:
        raise ValueError("cannot aggregate zero updates: no client replied")
    if stacked.is_floating_point():
        if not bool(torch.isfinite(stacked).all()):
            rows = (~torch.isfinite(stacked.reshape(len(stacked), -1))).any(1).nonzero().flatten()
            raise ValueError(
                f"updates of client(s) {rows.tolist()} hold NaN or inf; the server must reject "
                "non-finite updates before aggregating"
            )
    elif not allow_integer or stacked.is_complex():
        raise TypeError(f"updates must be a floating-point tensor, got {stacked.dtype}")
    return stacked.detach()


def _check_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor:
    """Sample shares ``a_i`` (float64, summing to 1); uniform when ``weights`` is None."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(w) != n:
        raise ValueError(f"got {n} updates but {len(w)} weights")
    return normalized_weights(w)


def _check_fraction(name: str, value: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value < high):
        raise ValueError(f"{name} must be in [{low}, {high}), got {value!r}")
    return float(value)


def _check_count(name: str, value: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Exact integer helpers (rational arithmetic, rounding half to even)
# ----------------------------------------------------------------------------------------------


def _exact_int_mean(rows: torch.Tensor) -> torch.Tensor:
    """Column means of an integer ``(m, ...)`` tensor, exact, rounded half to even, same dtype."""
    flat = rows.reshape(len(rows), -1).tolist()
    m = len(flat)
    out = [round(Fraction(sum(col), m)) for col in zip(*flat, strict=True)]
    return torch.tensor(out, dtype=rows.dtype).reshape(rows.shape[1:])


def _sorted_rows(stacked: torch.Tensor) -> torch.Tensor:
    return torch.sort(stacked, dim=0).values


# ----------------------------------------------------------------------------------------------
# Coordinate-wise statistics
# ----------------------------------------------------------------------------------------------


def coordinate_median(updates: TensorsLike) -> torch.Tensor:
    """Coordinate-wise median of ``n`` updates, unweighted (``np.median(updates, axis=0)``).

    For an even ``n`` it is the mean of the two middle values (as numpy and Flower's ``FedMedian``),
    not ``torch.median``'s lower middle value. Integer input gives the exact middle-pair mean,
    rounded half to even, in the input's dtype.
    """
    stacked = stack_updates(updates, allow_integer=True)
    n = len(stacked)
    if stacked.dtype == torch.bool:
        return coordinate_median(stacked.to(torch.int64)).to(torch.bool)
    lo, hi = (n - 1) // 2, n // 2
    if stacked.is_floating_point() and lo == hi:  # odd n: one selection, no full sort
        return torch.median(stacked, dim=0).values
    srt = _sorted_rows(stacked)
    if not stacked.is_floating_point():
        return _exact_int_mean(srt[lo : hi + 1])
    if lo == hi:
        return srt[lo].clone()
    # (a + b) / 2 in float64, cast back: exact for float32 inputs, no overflow for float64 ones
    return ((srt[lo].double() + srt[hi].double()) / 2).to(stacked.dtype)


def num_trimmed(n: int, beta: float) -> int:
    """``k = int(beta * n)``: how many values :func:`trimmed_mean` cuts from each end."""
    return int(_check_fraction("beta", beta, 0.0, 0.5) * n)


def trimmed_mean(
    updates: TensorsLike, beta: float | None = 0.1, *, num_trim: int | None = None
) -> torch.Tensor:
    """Coordinate-wise trimmed mean: cut ``k`` values from each end, average the rest (unweighted).

    ``k = int(beta * n)`` with ``beta`` in ``[0, 0.5)`` (Flower's ``FedTrimmedAvg``), or an explicit
    ``num_trim=k`` (then ``beta`` is ignored). ``k = 0`` is the plain mean -- never the empty slice
    ``[0:-0]`` -- and a ``k`` with ``2k >= n`` (nothing left to average) raises ``ValueError``.
    Integer input gives the exact mean of the kept values, rounded half to even.
    """
    stacked = stack_updates(updates, allow_integer=True)
    n = len(stacked)
    if num_trim is None:
        if beta is None:
            raise ValueError("give beta in [0, 0.5) or num_trim")
        k = num_trimmed(n, beta)
    else:
        k = _check_count("num_trim", num_trim)
    if 2 * k >= n:
        raise ValueError(
            f"trimming {k} value(s) from each end of {n} client(s) leaves nothing to average; "
            f"expected 2 * num_trim < n"
        )
    if stacked.dtype == torch.bool:
        return trimmed_mean(stacked.to(torch.int64), num_trim=k).to(torch.bool)
    kept = _sorted_rows(stacked)[k : n - k]
    if not stacked.is_floating_point():
        return _exact_int_mean(kept)
    return kept.double().mean(0).to(stacked.dtype)


# ----------------------------------------------------------------------------------------------
# Krum and Multi-Krum
# ----------------------------------------------------------------------------------------------


def pairwise_sq_distances(updates: TensorsLike, *, chunk: int = 1 << 16) -> torch.Tensor:
    """``(n, n)`` float64 matrix of squared L2 distances between the flattened updates.

    Computed as ``|x|^2 + |y|^2 - 2 x.y`` with float64 accumulation over column chunks (memory
    ``O(n * chunk)``, time ``O(n^2 d)``), clamped at 0, with an exact zero diagonal.
    """
    stacked = stack_updates(updates)
    flat = stacked.reshape(len(stacked), -1)
    n = len(flat)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk].double()
        gram += part @ part.T
    sq = gram.diagonal().clone()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    dist.fill_diagonal_(0)
    return dist


def krum_scores(updates: TensorsLike, num_malicious: int = 0) -> torch.Tensor:
    """Krum's score of every update: the sum of squared distances to its ``max(1, n - f - 2)``
    nearest *other* updates (all of them if fewer exist; a single client scores 0)."""
    f = _check_count("num_malicious", num_malicious)
    dist = pairwise_sq_distances(updates)
    n = len(dist)
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    closest = min(max(1, n - f - 2), n - 1)
    others = dist + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))  # exclude self
    return torch.sort(others, dim=1).values[:, :closest].sum(1)


def krum_select(updates: TensorsLike, num_malicious: int = 0, num_selected: int = 1) -> list[int]:
    """Indices of the ``num_selected`` lowest Krum scores (ties: the lower index first)."""
    m = _check_count("num_selected", num_selected, low=1)
    scores = krum_scores(updates, num_malicious)
    if m > len(scores):
        raise ValueError(f"num_selected={m} but only {len(scores)} update(s) were given")
    order = torch.sort(scores, stable=True).indices
    return [int(i) for i in order[:m]]


# ----------------------------------------------------------------------------------------------
# Geometric median, centered clipping, norm bounding
# ----------------------------------------------------------------------------------------------


def geometric_median(
    updates: TensorsLike,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    nu: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Smoothed Weiszfeld (RFA, Pillutla et al. 2022, Alg. 2): argmin_v sum_i a_i max(nu, |v - z_i|).

    Starts at the weighted mean; stops when the objective improves by less than ``tol`` times its
    value, or after ``max_iter`` iterations. Computed in float64, returned in the input's dtype.
    """
    stacked = stack_updates(updates)
    if not nu > 0:
        raise ValueError(f"nu (the smoothing) must be > 0, got {nu}")
    _check_count("max_iter", max_iter, low=1)
    a = _check_weights(weights, len(stacked))
    z = stacked.reshape(len(stacked), -1).double()
    v = a @ z

    def objective(dist: torch.Tensor) -> float:
        return float((a * dist.clamp_min(nu)).sum())

    dist = torch.linalg.vector_norm(z - v, dim=1)
    obj = objective(dist)
    for _ in range(max_iter):
        b = a / dist.clamp_min(nu)
        v = (b / b.sum()) @ z
        dist = torch.linalg.vector_norm(z - v, dim=1)
        new = objective(dist)
        if obj - new <= tol * new:
            break
        obj = new
    return v.reshape(stacked.shape[1:]).to(stacked.dtype)


def _clip_factors(diff: torch.Tensor, tau: float) -> torch.Tensor:
    norms = torch.linalg.vector_norm(diff, dim=1)
    return torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))


def centered_clip(
    updates: TensorsLike,
    tau: float,
    *,
    center: torch.Tensor | None = None,
    iterations: int = 1,
) -> torch.Tensor:
    """Centered clipping (Karimireddy et al. 2021): ``v <- v + mean_i clip_tau(x_i - v)``, repeated.

    ``center`` is the starting ``v`` (default 0: "no update"); ``tau`` the clipping radius (L2).
    Unweighted, as in the paper. Computed in float64, returned in the input's dtype.
    """
    stacked = stack_updates(updates)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau (the clipping radius) must be a finite number > 0, got {tau!r}")
    _check_count("iterations", iterations, low=1)
    x = stacked.reshape(len(stacked), -1).double()
    if center is None:
        v = torch.zeros(x.shape[1], dtype=torch.float64)
    else:
        if center.shape != stacked.shape[1:]:
            raise ValueError(
                f"center has shape {tuple(center.shape)}; the updates have {tuple(stacked.shape[1:])}"
            )
        v = center.reshape(-1).double()
    for _ in range(iterations):
        diff = x - v
        v = v + (_clip_factors(diff, tau)[:, None] * diff).mean(0)
    return v.reshape(stacked.shape[1:]).to(stacked.dtype)


def norm_bounded_mean(
    updates: TensorsLike,
    max_norm: float,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip each update to L2 norm ``max_norm``, then the (sample-)weighted mean (Sun et al. 2019)."""
    stacked = stack_updates(updates)
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    a = _check_weights(weights, len(stacked))
    x = stacked.reshape(len(stacked), -1).double()
    clipped = _clip_factors(x, max_norm)[:, None] * x
    return (a @ clipped).reshape(stacked.shape[1:]).to(stacked.dtype)


def inverse_loss_weights(losses: Sequence[float], *, eps: float = 1e-12) -> torch.Tensor:
    """The NAIVE "adaptive" weights ``(1 / max(loss_k, eps)) / sum_j (1 / max(loss_j, eps))``.

    Shown in chapter 03 as a failure: a client that reports ``loss = eps`` gets a weight of about 1.
    """
    values = [float(v) for v in losses]
    if not values:
        raise ValueError("no losses given")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"losses must be finite and >= 0, got {values}")
    inv = torch.tensor([1.0 / max(v, eps) for v in values], dtype=torch.float64)
    return inv / inv.sum()


# ----------------------------------------------------------------------------------------------
# State dicts <-> one delta vector per client
# ----------------------------------------------------------------------------------------------


def _float_keys(global_state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in global_state.items() if v.is_floating_point()]


def flatten_deltas(
    global_state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """``(n, d)`` matrix: row ``k`` is ``state_k - global`` over the floating entries, flattened.

    In float32 (float64 if the model has float64 entries). Shapes are checked against the global
    model (``ValueError`` naming the client and entry).
    """
    keys = _float_keys(global_state)
    if not states:
        raise ValueError("cannot aggregate zero updates: no client replied")
    dtype = (
        torch.float64
        if any(global_state[k].dtype == torch.float64 for k in keys)
        else torch.float32
    )
    d = sum(global_state[k].numel() for k in keys)
    out = torch.empty(len(states), d, dtype=dtype)
    for i, state in enumerate(states):
        start = 0
        for k in keys:
            ref = global_state[k]
            if k not in state:
                raise ValueError(f"client {i} update lacks {k!r}")
            if state[k].shape != ref.shape:
                raise ValueError(
                    f"client {i} update has shape {tuple(state[k].shape)} for {k!r}; "
                    f"the global model has {tuple(ref.shape)}"
                )
            view = out[i, start : start + ref.numel()].view(ref.shape)
            torch.sub(state[k].detach().to(dtype), ref.to(dtype), out=view)
            start += ref.numel()
    return out


def unflatten_delta(global_state: Mapping[str, torch.Tensor], delta: torch.Tensor) -> StateDict:
    """``global + delta`` for the floating entries (in their own dtypes); other entries copied."""
    out: StateDict = {}
    start = 0
    for k, ref in global_state.items():
        if ref.is_floating_point():
            part = delta[start : start + ref.numel()].reshape(ref.shape)
            out[k] = (ref.double() + part.double()).to(ref.dtype)
            start += ref.numel()
        else:
            out[k] = ref.clone()
    if start != delta.numel():
        raise ValueError(
            f"delta has {delta.numel()} values; the model's floating entries have {start}"
        )
    return out


def _median_buffers(
    global_state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]
) -> StateDict:
    """Integer buffers: exact coordinate-wise median; booleans: majority, ties keep the global's."""
    out: StateDict = {}
    for k, ref in global_state.items():
        if ref.is_floating_point():
            continue
        stacked = torch.stack([s[k].detach() for s in states])
        if ref.dtype == torch.bool:
            votes = stacked.to(torch.int64).sum(0) * 2
            n = len(states)
            out[k] = torch.where(votes == n, ref, votes > n)
        else:
            out[k] = coordinate_median(stacked)
    return out


# ----------------------------------------------------------------------------------------------
# Aggregators
# ----------------------------------------------------------------------------------------------


class _DeltaAggregator(Aggregator):
    """Base of the aggregators that reduce the stacked deltas to one delta."""

    def reduce(self, deltas: torch.Tensor, replies: Sequence[FitReply]) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        states = [r.state for r in replies]
        deltas = flatten_deltas(global_state, states)
        new = unflatten_delta(global_state, self.reduce(deltas, replies))
        new.update(_median_buffers(global_state, states))
        return new


class Median(_DeltaAggregator):
    """Coordinate-wise median of the deltas (unweighted; even ``n``: mean of the middle pair)."""

    def reduce(self, deltas: torch.Tensor, replies: Sequence[FitReply]) -> torch.Tensor:
        return coordinate_median(deltas)


class TrimmedMean(_DeltaAggregator):
    """Coordinate-wise ``beta``-trimmed mean of the deltas (``k = int(beta * n)`` per end, unweighted)."""

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = _check_fraction("beta", beta, 0.0, 0.5)

    def reduce(self, deltas: torch.Tensor, replies: Sequence[FitReply]) -> torch.Tensor:
        return trimmed_mean(deltas, self.beta)

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "beta": self.beta}


class MultiKrum(Aggregator):
    """Multi-Krum: the sample-weighted mean of the ``num_selected`` updates with the lowest scores.

    ``num_malicious`` is Krum's ``f``. Scores use the deltas (exact float64 distances); the selected
    clients' whole states, integer buffers included, are averaged by
    :func:`~labsupport.fl.state.aggregate`. The selection of the last round is kept in
    :attr:`last_selected` (client ids) for the chapter's tables.
    """

    def __init__(self, num_malicious: int = 0, num_selected: int = 1) -> None:
        self.num_malicious = _check_count("num_malicious", num_malicious)
        self.num_selected = _check_count("num_selected", num_selected, low=1)
        self.last_selected: list[int] = []

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        deltas = flatten_deltas(global_state, [r.state for r in replies])
        chosen = krum_select(deltas, self.num_malicious, min(self.num_selected, len(replies)))
        self.last_selected = [replies[i].client for i in chosen]
        return aggregate(
            [replies[i].state for i in chosen], [replies[i].num_samples for i in chosen]
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "num_malicious": self.num_malicious,
            "num_selected": self.num_selected,
        }


class Krum(MultiKrum):
    """Krum: the new global model is the single update with the lowest score."""

    def __init__(self, num_malicious: int = 0) -> None:
        super().__init__(num_malicious, 1)

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "num_malicious": self.num_malicious}


class GeometricMedian(_DeltaAggregator):
    """RFA: the sample-weighted geometric median of the deltas (smoothed Weiszfeld)."""

    def __init__(self, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-7) -> None:
        self.nu, self.max_iter, self.tol = float(nu), int(max_iter), float(tol)

    def reduce(self, deltas: torch.Tensor, replies: Sequence[FitReply]) -> torch.Tensor:
        w = [r.num_samples for r in replies]
        return geometric_median(deltas, w, nu=self.nu, max_iter=self.max_iter, tol=self.tol)

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "nu": self.nu,
            "max_iter": self.max_iter,
            "tol": self.tol,
        }


def median_norm(deltas: torch.Tensor) -> float:
    """The median L2 norm of the rows: a radius no minority of clients can inflate."""
    norms = torch.linalg.vector_norm(stack_updates(deltas).reshape(len(deltas), -1).double(), dim=1)
    return max(float(norms.median()), 1e-12)


class CenteredClipping(_DeltaAggregator):
    """Centered clipping of the deltas around 0 (the current global model), radius ``tau``.

    ``tau=None`` takes the round's median delta norm (:func:`median_norm`): a majority of honest
    clients sets the radius, whatever the scale of the model's updates.
    """

    def __init__(self, tau: float | None = None, iterations: int = 3) -> None:
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be > 0 or None (the median norm), got {tau}")
        self.tau = None if tau is None else float(tau)
        self.iterations = _check_count("iterations", iterations, low=1)

    def reduce(self, deltas: torch.Tensor, replies: Sequence[FitReply]) -> torch.Tensor:
        tau = self.tau if self.tau is not None else median_norm(deltas)
        return centered_clip(deltas, tau, iterations=self.iterations)

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "tau": self.tau, "iterations": self.iterations}


class NormBounding(_DeltaAggregator):
    """Each delta clipped to L2 norm ``max_norm``, then the sample-weighted mean.

    ``max_norm=None`` takes the round's median delta norm (:func:`median_norm`).
    """

    def __init__(self, max_norm: float | None = None) -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None (the median norm), got {max_norm}")
        self.max_norm = None if max_norm is None else float(max_norm)

    def reduce(self, deltas: torch.Tensor, replies: Sequence[FitReply]) -> torch.Tensor:
        bound = self.max_norm if self.max_norm is not None else median_norm(deltas)
        return norm_bounded_mean(deltas, bound, [r.num_samples for r in replies])

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "max_norm": self.max_norm}


def client_drift(deltas: TensorsLike) -> dict[str, float]:
    """How far the client updates spread around their mean (chapter 03's measure of client drift).

    ``spread = sqrt(mean_k ||Delta_k - mean Delta||^2)`` (unweighted), ``mean_norm = ||mean Delta||``
    and their ratio ``relative`` (large when clients pull in different directions).
    """
    x = stack_updates(deltas)
    x = x.reshape(len(x), -1).double()
    mean = x.mean(0)
    spread = float(((x - mean) ** 2).sum(1).mean().sqrt())
    norm = float(mean.norm())
    return {"spread": spread, "mean_norm": norm, "relative": spread / max(norm, 1e-12)}


class DriftMeter(Aggregator):
    """Wraps an aggregator and records :func:`client_drift` of every round in :attr:`drift`.

    Behaves exactly as the wrapped aggregator (instructions, config, state); measurement only.
    """

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner
        self.drift: list[dict[str, float]] = []

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        self.drift.append(client_drift(flatten_deltas(global_state, [r.state for r in replies])))
        return self.inner.aggregate(global_state, replies)

    def instructions(self, server_round: int, global_state: StateDict) -> dict[str, Any]:
        return self.inner.instructions(server_round, global_state)

    def config(self) -> dict[str, Any]:
        return self.inner.config()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


class InverseLossWeighting(Aggregator):
    """NAIVE: the mean of the replies weighted by ``1 / metrics["loss"]`` (not robust; see module doc).

    Integer buffers are averaged with the same weights (exactly). A reply without a ``loss`` metric
    raises ``ValueError``. The weights of the last round are kept in :attr:`last_weights`.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = float(eps)
        self.last_weights: dict[int, float] = {}

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        missing = [r.client for r in replies if "loss" not in r.metrics]
        if missing:
            raise ValueError(f"client(s) {missing} reported no 'loss' metric")
        w = inverse_loss_weights([r.metrics["loss"] for r in replies], eps=self.eps)
        self.last_weights = {r.client: float(v) for r, v in zip(replies, w, strict=True)}
        return aggregate([r.state for r in replies], w.tolist())

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "eps": self.eps}
