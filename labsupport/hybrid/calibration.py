"""Confidence calibration for the edge model: temperature scaling, expected calibration error and the
reliability diagram (chapter 05, section 3).

Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML
2017, section 4.2) divides the logits by one scalar ``T > 0`` fitted on a held-out validation split by
minimizing the negative log-likelihood ``NLL(T) = -mean_i log softmax(z_i / T)[y_i]``. It does not change
the argmax (accuracy is unchanged) but makes max-softmax confidences mean what they say, which is what a
confidence threshold for offloading needs. We optimize ``log T`` (so ``T`` stays positive) with L-BFGS.

Expected calibration error (Naeini et al. 2015; Guo et al. 2017, eq. 3) with ``M`` equal-width bins over
confidence ``(0, 1]``: ``ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)|``. :func:`reliability_bins`
returns the per-bin accuracy, confidence and count that the reliability diagram plots
(:func:`plot_reliability`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "nll",
    "plot_reliability",
    "reliability_bins",
]


def _as_tensor(x, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x.detach().to(dtype)


def _check_logits_labels(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    z = _as_tensor(logits, "logits", torch.float64)
    y = _as_tensor(labels, "labels", torch.int64)
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(
            f"logits must be (N, C) and labels (N,); got {tuple(z.shape)} and {tuple(y.shape)}"
        )
    if len(y) == 0:
        raise ValueError("cannot calibrate on an empty split")
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(
            f"labels must lie in 0..{z.shape[1] - 1}, got {int(y.min())}..{int(y.max())}"
        )
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    return z, y


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z, y = _check_logits_labels(logits, labels)
    return float(F.cross_entropy(z / temperature, y))


def fit_temperature(logits, labels, *, max_iter: int = 100) -> float:
    """The temperature ``T`` that minimizes validation NLL (Guo et al. 2017), by L-BFGS on ``log T``."""
    # callers may sit under no_grad/inference_mode (evaluation code): this fit needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        z, y = (t.clone() for t in _check_logits_labels(logits, labels))
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t) or t <= 0:  # pragma: no cover - L-BFGS on a convex 1-D problem
        raise RuntimeError(f"temperature scaling diverged (T = {t})")
    return t


def apply_temperature(logits, temperature: float) -> torch.Tensor:
    """Calibrated probabilities ``softmax(logits / T)`` (float32)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _as_tensor(logits, "logits", torch.float32)
    return torch.softmax(z / temperature, dim=-1)


def reliability_bins(probs, labels, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin ``accuracy``, mean ``confidence`` and ``count`` over ``n_bins`` equal-width bins.

    ``probs`` are (N, C) probabilities; a sample falls in bin m when its max probability lies in
    ``(m/M, (m+1)/M]``. Empty bins have NaN accuracy and confidence.
    """
    p = _as_tensor(probs, "probs", torch.float64).numpy()
    y = _as_tensor(labels, "labels", torch.int64).numpy()
    if p.ndim != 2 or y.shape != (len(p),):
        raise ValueError(f"probs must be (N, C) and labels (N,); got {p.shape} and {y.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bin m holds (m/M, (m+1)/M]; a confidence of exactly 0 cannot occur for a softmax
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return {
        "accuracy": acc,
        "confidence": mean_conf,
        "count": count,
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
    }


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (Guo et al. 2017, eq. 3)."""
    b = reliability_bins(probs, labels, n_bins)
    n = b["count"].sum()
    if n == 0:
        raise ValueError("cannot compute ECE of an empty split")
    used = b["count"] > 0
    gap = np.abs(b["accuracy"][used] - b["confidence"][used])
    return float((b["count"][used] / n * gap).sum())


def plot_reliability(ax, probs, labels, *, n_bins: int = 15, label: str = "", color=None):
    """Reliability diagram on ``ax``: accuracy per confidence bin against the diagonal."""
    b = reliability_bins(probs, labels, n_bins)
    centers = (b["edges"][:-1] + b["edges"][1:]) / 2
    used = b["count"] > 0
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.bar(
        centers[used],
        b["accuracy"][used],
        width=1.0 / n_bins,
        alpha=0.45,
        edgecolor="black",
        color=color,
        label=f"{label} (ECE {ece:.3f})".strip(),
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy in bin")
    return ax
