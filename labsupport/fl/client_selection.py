"""Client selection rules beyond uniform sampling: power-of-choice, and a naive "diverse" rule.

The server samples ``m = max(C * K, 1)`` clients uniformly (:func:`labsupport.fl.selection.select_clients`,
McMahan et al. 2017). Under non-IID data which clients are picked matters; chapter 03 compares:

* :func:`uniform` -- the server's rule, unchanged (the baseline).
* :func:`power_of_choice` -- Cho, Wang & Joshi, "Towards understanding biased client selection in
  federated learning" (AISTATS 2022), Algorithm 1: draw a candidate set ``A`` of ``d >= m`` clients
  without replacement with probability proportional to their data size ``p_k``, ask each candidate for
  the current global model's loss on its data, select the ``m`` with the highest loss. ``d = m`` is
  uniform-like; larger ``d`` biases toward clients the model serves worst (faster early progress,
  a bias the paper bounds).
* :func:`most_diverse` -- the NAIVE rule of common teaching code: "always pick the clients with the
  most diverse labels" (highest label entropy). It is deterministic, so it picks the *same* clients
  every round: the rest never train (:func:`participation_counts` shows the starvation), and it needs
  every client's label histogram, which is private information.

Each selector has the shape of ``select_clients`` -- ``(num_clients, fraction, *, min_clients, seed,
server_round) -> sorted list of ids`` -- plus what it needs (losses, label counts) as keyword arguments;
:func:`bind` fixes those so the server can call it. :func:`global_losses` computes the losses
power-of-choice asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .selection import num_selected, select_clients

__all__ = [
    "Selector",
    "bind",
    "global_losses",
    "label_entropy",
    "most_diverse",
    "participation_counts",
    "power_of_choice",
    "uniform",
]

Selector = Callable[..., list[int]]
LossesLike = Sequence[float] | Callable[[list[int]], Sequence[float]]


def _check(num_clients: int, fraction: float, min_clients: int) -> int:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not 1 <= min_clients <= num_clients:
        raise ValueError(f"min_clients must be in [1, {num_clients}], got {min_clients}")
    return num_selected(num_clients, fraction, min_clients)


def uniform(
    num_clients: int, fraction: float, *, min_clients: int = 1, seed: int = 0, server_round: int = 1
) -> list[int]:
    """The server's own rule: ``m`` clients uniformly without replacement."""
    return select_clients(
        num_clients, fraction, min_clients=min_clients, seed=seed, server_round=server_round
    )


def power_of_choice(
    num_clients: int,
    fraction: float,
    *,
    losses: LossesLike,
    sizes: Sequence[float] | None = None,
    d: int | None = None,
    min_clients: int = 1,
    seed: int = 0,
    server_round: int = 1,
) -> list[int]:
    """Power-of-choice (Cho et al. 2022): the ``m`` highest-loss clients of ``d`` candidates.

    ``losses`` is either every client's loss (a sequence of length ``num_clients``) or a function
    ``f(candidates) -> losses`` (only the candidates are asked, as in the paper). Candidates are
    drawn with probability ``sizes / sum(sizes)`` (uniform if None); ``d`` defaults to ``2 * m``
    (capped at ``num_clients``). Ties in loss go to the lower id.
    """
    m = _check(num_clients, fraction, min_clients)
    d = min(num_clients, 2 * m if d is None else int(d))
    if d < m:
        raise ValueError(f"d (candidates) must be >= m = {m} (clients to select), got {d}")
    p = np.ones(num_clients) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if p.shape != (num_clients,) or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"sizes must be {num_clients} finite numbers > 0")
    rng = np.random.default_rng([seed, server_round, 7])
    candidates = sorted(
        int(i) for i in rng.choice(num_clients, size=d, replace=False, p=p / p.sum())
    )
    if callable(losses):
        values = [float(v) for v in losses(candidates)]
    else:
        if len(losses) != num_clients:
            raise ValueError(
                f"losses has {len(losses)} entries; expected one per client ({num_clients})"
            )
        values = [float(losses[i]) for i in candidates]
    if len(values) != len(candidates) or not all(np.isfinite(values)):
        raise ValueError(
            f"expected {len(candidates)} finite losses for the candidates, got {values}"
        )
    order = sorted(range(d), key=lambda j: (-values[j], candidates[j]))
    return sorted(candidates[j] for j in order[:m])


def label_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of a ``(clients, classes)`` label-count matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return h


def most_diverse(
    num_clients: int,
    fraction: float,
    *,
    label_counts: np.ndarray,
    min_clients: int = 1,
    seed: int = 0,
    server_round: int = 1,
) -> list[int]:
    """NAIVE: the ``m`` clients with the highest label entropy -- the same ones every round.

    ``seed`` and ``server_round`` are accepted for the common shape and deliberately unused: that
    is the flaw this rule demonstrates.
    """
    m = _check(num_clients, fraction, min_clients)
    h = label_entropy(label_counts)
    if len(h) != num_clients:
        raise ValueError(f"label_counts has {len(h)} rows; expected {num_clients}")
    order = sorted(range(num_clients), key=lambda i: (-h[i], i))
    return sorted(order[:m])


def bind(selector: Selector, **kwargs) -> Selector:
    """``selector`` with its extra arguments fixed: a function of ``select_clients``'s shape."""

    def selected(num_clients: int, fraction: float, **shape) -> list[int]:
        return selector(num_clients, fraction, **shape, **kwargs)

    return selected


@torch.no_grad()
def global_losses(
    model: nn.Module, clients: Sequence, candidates: Sequence[int], *, max_samples: int = 256
) -> list[float]:
    """The model's mean cross-entropy on (at most ``max_samples`` of) each candidate's data.

    What power-of-choice asks of a candidate: one forward pass, no training. ``clients`` need ``x``
    and ``y`` (a :class:`~labsupport.fl.clients.DataClient`).
    """
    was = model.training
    model.eval()
    out = []
    for i in candidates:
        c = clients[i]
        x, y = c.x[:max_samples], c.y[:max_samples]
        out.append(float(nn.functional.cross_entropy(model(x), y)))
    model.train(was)
    return out


def participation_counts(selections: Sequence[Sequence[int]], num_clients: int) -> np.ndarray:
    """How many rounds each client was selected in (the participation histogram)."""
    counts = np.zeros(num_clients, dtype=np.int64)
    for sel in selections:
        for i in sel:
            if not 0 <= i < num_clients:
                raise ValueError(f"selected client {i} is not in [0, {num_clients})")
            counts[i] += 1
    return counts
