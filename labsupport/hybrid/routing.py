"""Confidence-based routing between an edge model and a cloud model (chapter 05, section 3).

The edge model answers every input; an input is *offloaded* to the cloud when the edge's confidence is
below a threshold. This is the cascade of Viola & Jones (2001) applied to edge–cloud inference
(Teerapittayanon, McDanel & Kung, "Distributed Deep Neural Networks over the Cloud, the Edge and End
Devices", ICDCS 2017; Kang et al., "Neurosurgeon", ASPLOS 2017 for the split variant).

* Confidence scores from (calibrated) probabilities ``p``: :func:`max_softmax` ``max_c p_c``,
  :func:`margin` (top-1 minus top-2), and :func:`neg_entropy` ``sum_c p_c log p_c`` (higher is more
  confident), all over a batch at once; :data:`SCORES` names them.
* :func:`route` -- the decision, vectorized: a boolean mask ``offload = confidence < threshold`` (ties
  stay on the edge; a NaN confidence is offloaded). :class:`FastRouter` is the same decision for the
  calibrated max-softmax score on the device's hot path, straight from the logits: ``max_c
  softmax(z/T)_c < t`` is ``sum_c exp((z_c - z_max) / T) > 1/t``. Calling it runs
  :func:`labsupport.hybrid.route_kernel.offload_rows`, one compiled (numba) loop that decides most
  rows from the gap between their top two logits, with no ``exp`` (the ``hybrid`` benchmark times
  it beside the numpy version and the textbook route, against the edge model).
  :meth:`FastRouter.decide` also returns the confidence, with numpy (``1/T`` folded into one
  multiply, the row sum a matrix-vector product). :func:`offload_mask` wraps it for tensors.
  :func:`hybrid_predictions` merges the two answers with the mask.
* :func:`tradeoff_curve` -- hybrid accuracy against the fraction offloaded for every threshold at once
  (sort by confidence, cumulative sums), and :func:`choose_threshold` picks a threshold from a target
  on the *validation* split: ``"cloud_gap"`` (the lowest offload whose hybrid accuracy is within
  ``gap`` of the cloud's) or ``"max_offload"`` (the best accuracy offloading at most a fraction).
  With ``level`` (e.g. 0.95) the ``"cloud_gap"`` target holds for a one-sided upper confidence bound
  on the accuracy lost, not for the point estimate: the first cut where the validation curve
  crosses the target is where sampling noise flatters it most (the selection-with-guaranteed-risk
  idea of Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017,
  here with a normal approximation).
* :func:`naive_route` -- the pattern the chapter corrects: ``.item()`` on a batch (fails for batch
  > 1), no ``eval()``/``no_grad``, uncalibrated softmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

__all__ = [
    "SCORES",
    "FastRouter",
    "ThresholdChoice",
    "choose_threshold",
    "hybrid_predictions",
    "margin",
    "max_softmax",
    "naive_route",
    "neg_entropy",
    "offload_mask",
    "route",
    "tradeoff_curve",
]


def _probs(p) -> torch.Tensor:
    if isinstance(p, np.ndarray):
        p = torch.from_numpy(p)
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"probabilities must be a numpy array or tensor, got {type(p).__name__}")
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, C) with C >= 2, got {tuple(p.shape)}")
    return p


def max_softmax(p) -> torch.Tensor:
    """Top-1 probability per row (Hendrycks & Gimpel 2017's baseline score)."""
    return _probs(p).max(dim=1).values


def margin(p) -> torch.Tensor:
    """Top-1 minus top-2 probability per row."""
    top2 = _probs(p).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def neg_entropy(p) -> torch.Tensor:
    """``sum_c p_c log p_c`` per row (0 for a one-hot row, ``-log C`` for a uniform one)."""
    p = _probs(p)
    return torch.special.xlogy(p, p).sum(dim=1)


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_softmax": max_softmax,
    "margin": margin,
    "neg_entropy": neg_entropy,
}


def route(confidence, threshold: float) -> torch.Tensor:
    """Boolean offload mask: ``confidence < threshold`` (a tie stays on the edge)."""
    c = torch.as_tensor(confidence)
    if c.ndim != 1:
        raise ValueError(f"confidence must be a 1-D batch of scores, got shape {tuple(c.shape)}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return ~(c >= threshold)


class FastRouter:
    """The calibrated max-softmax offload decision, folded for the device's hot path.

    ``FastRouter(T, t)(logits)`` is ``max_softmax(softmax(logits / T)) < t`` for ``(N, C)`` numpy
    logits, in one call of the compiled :func:`~labsupport.hybrid.route_kernel.offload_rows` (its
    docstring gives the bounds that let it skip ``exp`` for most rows). A row with a NaN logit, or an
    infinite largest one, is offloaded. :meth:`confidence` and :meth:`decide` also return the
    calibrated max softmax itself: ``1/T`` and ``1/t`` are folded once here, and per batch ``z_pred``
    (the logit of the edge's answer ``pred = logits.argmax(1)``) is gathered, ``exp((z - z_pred) /
    T)`` summed by a matrix-vector product and compared with ``1/t``; subtracting ``z_pred`` (the
    row maximum) keeps ``exp`` from overflowing.
    """

    def __init__(self, temperature: float, threshold: float) -> None:
        if not temperature > 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if not threshold > 0 or not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite and > 0, got {threshold}")
        self.temperature, self.threshold = float(temperature), float(threshold)
        self._inv_t = np.float32(1.0 / temperature)
        self._bound = np.float32(1.0 / threshold)
        self._inv_t64, self._bound64 = 1.0 / self.temperature, 1.0 / self.threshold
        self._shape = (-1, -1)
        self._run: Callable | None = None

    def _sums(self, logits: np.ndarray, pred: np.ndarray) -> np.ndarray:
        if logits.shape != self._shape:  # per batch shape, once: row offsets and a ones vector
            n, c = logits.shape
            self._offsets, self._ones = np.arange(n) * c, np.ones(c, dtype=np.float32)
            self._shape = logits.shape
        e = logits - logits.ravel()[self._offsets + pred][:, None]  # z - z_pred, row by row
        e *= self._inv_t  # calibration: one multiply
        np.exp(e, out=e)
        return e @ self._ones

    def __call__(self, logits: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
        """Boolean offload mask ``(N,)`` (a confidence equal to the threshold stays on the edge).

        ``pred`` is accepted for symmetry with :meth:`decide` and not needed: the kernel finds each
        row's largest logits itself."""
        if not isinstance(logits, np.ndarray) or logits.ndim != 2:
            raise ValueError(f"logits must be an (N, C) numpy array, got {_shape_of(logits)}")
        run = self._run
        if run is None:  # numba's import and the kernel's load cost about a second, once
            from .route_kernel import offload_rows as run

            self._run = run
        return run(logits, self._inv_t64, self._bound64)

    def confidence(self, logits: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """The calibrated max softmax ``(N,)``: ``1 / sum_c exp((z_c - z_pred) / T)``."""
        return 1.0 / self._sums(logits, pred)

    def decide(self, logits: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(confidence, offload mask)`` from one numpy pass (a NaN confidence is offloaded)."""
        sums = self._sums(logits, pred)
        return 1.0 / sums, ~(sums <= self._bound)


def _shape_of(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__


def offload_mask(logits, temperature: float, threshold: float) -> torch.Tensor:
    """``max_softmax(softmax(logits / temperature)) < threshold`` without building probabilities
    (:class:`FastRouter` on a tensor or array of logits)."""
    z = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float32)
    return torch.from_numpy(FastRouter(temperature, threshold)(z, z.argmax(axis=1)))


def hybrid_predictions(edge_pred, cloud_pred, offload) -> torch.Tensor:
    """The answer per input: the cloud's where ``offload`` is True, else the edge's."""
    e, c, m = torch.as_tensor(edge_pred), torch.as_tensor(cloud_pred), torch.as_tensor(offload)
    if not (e.shape == c.shape == m.shape):
        raise ValueError(
            f"edge_pred, cloud_pred and offload must have one shape; got {tuple(e.shape)}, "
            f"{tuple(c.shape)}, {tuple(m.shape)}"
        )
    if m.dtype != torch.bool:
        raise TypeError(f"offload must be a boolean mask, got dtype {m.dtype}")
    return torch.where(m, c, e)


def _as_arrays(confidence, edge_correct, cloud_correct):
    c = np.asarray(torch.as_tensor(confidence), dtype=np.float64)
    e = np.asarray(torch.as_tensor(edge_correct), dtype=bool)
    k = np.asarray(torch.as_tensor(cloud_correct), dtype=bool)
    if not (c.ndim == 1 and c.shape == e.shape == k.shape) or len(c) == 0:
        raise ValueError(
            f"confidence, edge_correct and cloud_correct must be non-empty 1-D arrays of one length; "
            f"got {c.shape}, {e.shape}, {k.shape}"
        )
    if not np.isfinite(c).all():
        raise ValueError("confidence contains NaN or inf")
    return c, e, k


def _sorted_cuts(c: np.ndarray, e: np.ndarray, k: np.ndarray):
    """Inputs sorted by confidence and the valid cut points ``k = 0..n`` (offload the first k):
    ``k = 0``, ``k = n``, and every ``k`` between two distinct confidences."""
    order = np.argsort(c, kind="stable")
    cs = c[order]
    valid = np.ones(len(c) + 1, dtype=bool)
    valid[1:-1] = cs[:-1] < cs[1:]
    return cs, e[order], k[order], valid


def tradeoff_curve(confidence, edge_correct, cloud_correct) -> dict[str, np.ndarray]:
    """Hybrid accuracy and fraction offloaded for every distinct threshold, vectorized.

    Inputs are sorted by confidence; offloading the ``k`` least confident inputs gives accuracy
    ``(cloud correct among the first k + edge correct among the rest) / n``. Only cut points between
    distinct confidences are kept (a threshold cannot split ties). ``threshold[k]`` offloads exactly
    ``k`` inputs: the k-th smallest distinct value above them (``inf`` offloads everything).
    """
    c, e, k = _as_arrays(confidence, edge_correct, cloud_correct)
    cs, es, ks, valid = _sorted_cuts(c, e, k)
    n = len(c)
    cloud_prefix = np.concatenate([[0], np.cumsum(ks)])  # cloud correct among the first k
    edge_suffix = np.concatenate([[0], np.cumsum(es)])
    edge_rest = edge_suffix[-1] - edge_suffix  # edge correct among the rest
    accuracy = (cloud_prefix + edge_rest) / n
    thresholds = np.concatenate([cs, [np.inf]])  # offload c < cs[k] -> exactly the first k
    ks_all = np.arange(n + 1)
    return {
        "threshold": thresholds[valid],
        "offload": ks_all[valid] / n,
        "accuracy": accuracy[valid],
    }


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold chosen on validation data, with what it achieved there."""

    threshold: float
    offload: float
    accuracy: float
    cloud_accuracy: float
    edge_accuracy: float
    target: str
    met: bool


def choose_threshold(
    confidence,
    edge_correct,
    cloud_correct,
    *,
    target: str = "cloud_gap",
    gap: float = 0.005,
    max_offload: float = 0.3,
    level: float | None = None,
) -> ThresholdChoice:
    """A confidence threshold from a target, on validation data.

    ``target="cloud_gap"``: the smallest offload fraction whose hybrid accuracy is at least cloud
    accuracy minus ``gap`` (0.005 = half a point); if none reaches it (impossible only when the cloud
    itself is below that), the most accurate point, with ``met=False``. ``target="max_offload"``: the
    most accurate threshold that offloads at most ``max_offload`` of the inputs (ties: less offload).

    ``level`` (``"cloud_gap"`` only; e.g. 0.95): require the one-sided ``level`` upper confidence
    bound of the accuracy lost, not its estimate, to be within ``gap``. The loss at a cut is the mean
    of ``D_i = cloud_correct_i - edge_correct_i`` over the inputs kept on the edge (0 for the
    offloaded ones); its bound is ``mean(D) + z_level * std(D) / sqrt(n)`` (normal approximation).
    """
    c, e, k = _as_arrays(confidence, edge_correct, cloud_correct)
    curve = tradeoff_curve(c, e, k)
    n_cloud, n_edge = float(k.mean()), float(e.mean())
    acc, off, thr = curve["accuracy"], curve["offload"], curve["threshold"]
    if target == "cloud_gap":
        if not 0.0 <= gap < 1.0:
            raise ValueError(f"gap must be in [0, 1), got {gap}")
        loss = n_cloud - acc
        if level is not None:
            if not 0.5 <= level < 1.0:
                raise ValueError(f"level must be in [0.5, 1) or None, got {level}")
            _, es, ks, valid = _sorted_cuts(c, e, k)
            d = ks.astype(np.float64) - es
            # sum over the inputs kept on the edge (i >= cut) of |D_i| = D_i^2
            sq = np.concatenate([np.cumsum(np.abs(d)[::-1])[::-1], [0.0]])[valid]
            var = np.maximum(sq / len(c) - loss**2, 0.0)
            loss = loss + NormalDist().inv_cdf(level) * np.sqrt(var / len(c))
        ok = loss <= gap + 1e-12
        i = int(np.argmax(ok)) if ok.any() else int(np.argmax(acc))
        met = bool(ok.any())
    elif target == "max_offload":
        if level is not None:
            raise ValueError("level applies to target='cloud_gap' only")
        if not 0.0 <= max_offload <= 1.0:
            raise ValueError(f"max_offload must be in [0, 1], got {max_offload}")
        allowed = np.flatnonzero(off <= max_offload + 1e-12)  # k = 0 is always allowed
        i = int(allowed[np.argmax(acc[allowed])])  # argmax takes the first, i.e. least offload
        met = True
    else:
        raise ValueError(f"unknown target {target!r}; expected 'cloud_gap' or 'max_offload'")
    return ThresholdChoice(
        threshold=float(thr[i]),
        offload=float(off[i]),
        accuracy=float(acc[i]),
        cloud_accuracy=n_cloud,
        edge_accuracy=n_edge,
        target=target,
        met=met,
    )


def naive_route(model: torch.nn.Module, x: torch.Tensor, threshold: float) -> str:
    """The naive router, for the notebook to run and watch fail: do not use.

    It leaves the model in training mode and records autograd history, trusts raw softmax, and calls
    ``.item()`` on what is a batch of confidences -- which raises for any batch of more than one.
    """
    probs = torch.softmax(model(x), dim=1)
    conf = probs.max(dim=1).values
    return "cloud" if conf.item() < threshold else "edge"
