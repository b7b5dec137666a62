"""Confidence-based routing between an edge model and a cloud model (chapter 05, section 3).

The edge model answers every input; an input is *offloaded* to the cloud when the edge's confidence is
below a threshold. This is the cascade of Viola & Jones (2001) applied to edge–cloud inference
(Teerapittayanon, McDanel & Kung, "Distributed Deep Neural Networks over the Cloud, the Edge and End
Devices", ICDCS 2017; Kang et al., "Neurosurgeon", ASPLOS 2017 for the split variant).

* Confidence scores from (calibrated) probabilities ``p``: :func:`max_softmax` ``max_c p_c``,
  :func:`margin` (top-1 minus top-2), and :func:`neg_entropy` ``sum_c p_c log p_c`` (higher is more
  confident), all over a batch at once; :data:`SCORES` names them.
* :func:`route` -- the decision, vectorized: a boolean mask ``offload = confidence < threshold`` (ties
  stay on the edge). :func:`offload_mask` is the same decision for the max-softmax score fused into
  one pass over the logits (``max_c softmax(z/T)_c < t`` is ``sum_c exp((z_c - max z)/T) > 1/t``),
  for the device's hot path. :func:`hybrid_predictions` merges the two answers with the mask.
* :func:`tradeoff_curve` -- hybrid accuracy against the fraction offloaded for every threshold at once
  (sort by confidence, cumulative sums), and :func:`choose_threshold` picks a threshold from a target
  on the *validation* split: ``"cloud_gap"`` (the lowest offload whose hybrid accuracy is within
  ``gap`` of the cloud's) or ``"max_offload"`` (the best accuracy offloading at most a fraction).
* :func:`naive_route` -- the pattern the chapter corrects: ``.item()`` on a batch (fails for batch
  > 1), no ``eval()``/``no_grad``, uncalibrated softmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SCORES",
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
    return c < threshold


def offload_mask(logits, temperature: float, threshold: float) -> torch.Tensor:
    """``max_softmax(softmax(logits / temperature)) < threshold`` without building probabilities.

    ``sum_c exp((z_c - max_c z) / T)`` is ``1 / max softmax``; five numpy operations on the logits.
    """
    if not temperature > 0 or not 0.0 < threshold:
        raise ValueError(f"need temperature > 0 and threshold > 0, got {temperature}, {threshold}")
    z = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    inv_p = np.exp((z - z.max(axis=1, keepdims=True)) * (1.0 / temperature)).sum(axis=1)
    return torch.from_numpy(inv_p > 1.0 / threshold)


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


def tradeoff_curve(confidence, edge_correct, cloud_correct) -> dict[str, np.ndarray]:
    """Hybrid accuracy and fraction offloaded for every distinct threshold, vectorized.

    Inputs are sorted by confidence; offloading the ``k`` least confident inputs gives accuracy
    ``(cloud correct among the first k + edge correct among the rest) / n``. Only cut points between
    distinct confidences are kept (a threshold cannot split ties). ``threshold[k]`` offloads exactly
    ``k`` inputs: the k-th smallest distinct value above them (``inf`` offloads everything).
    """
    c = np.asarray(torch.as_tensor(confidence), dtype=np.float64)
    e = np.asarray(torch.as_tensor(edge_correct), dtype=bool)
    k = np.asarray(torch.as_tensor(cloud_correct), dtype=bool)
    if not (c.ndim == 1 and c.shape == e.shape == k.shape) or len(c) == 0:
        raise ValueError(
            f"confidence, edge_correct and cloud_correct must be non-empty 1-D arrays of one length; "
            f"got {c.shape}, {e.shape}, {k.shape}"
        )
    order = np.argsort(c, kind="stable")
    cs, es, ks = c[order], e[order], k[order]
    n = len(c)
    cloud_prefix = np.concatenate([[0], np.cumsum(ks)])  # cloud correct among the first k
    edge_suffix = np.concatenate([[0], np.cumsum(es)])
    edge_rest = edge_suffix[-1] - edge_suffix  # edge correct among the rest
    accuracy = (cloud_prefix + edge_rest) / n
    # valid cuts: k = 0, k = n, and k where cs[k-1] < cs[k]
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = cs[:-1] < cs[1:]
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
) -> ThresholdChoice:
    """A confidence threshold from a target, on validation data.

    ``target="cloud_gap"``: the smallest offload fraction whose hybrid accuracy is at least cloud
    accuracy minus ``gap`` (0.005 = half a point); if none reaches it (impossible only when the cloud
    itself is below that), the most accurate point, with ``met=False``. ``target="max_offload"``: the
    most accurate threshold that offloads at most ``max_offload`` of the inputs (ties: less offload).
    """
    curve = tradeoff_curve(confidence, edge_correct, cloud_correct)
    n_cloud = float(np.mean(np.asarray(torch.as_tensor(cloud_correct), dtype=bool)))
    n_edge = float(np.mean(np.asarray(torch.as_tensor(edge_correct), dtype=bool)))
    acc, off, thr = curve["accuracy"], curve["offload"], curve["threshold"]
    if target == "cloud_gap":
        if not 0.0 <= gap < 1.0:
            raise ValueError(f"gap must be in [0, 1), got {gap}")
        ok = acc >= n_cloud - gap - 1e-12
        i = int(np.argmax(ok)) if ok.any() else int(np.argmax(acc))
        met = bool(ok.any())
    elif target == "max_offload":
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
