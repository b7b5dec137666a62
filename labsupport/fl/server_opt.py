"""Server optimizers: FedAvgM and FedAdam over the mean client update (the pseudo-gradient).

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive federated optimization"
(ICLR 2021), Algorithm 2: the server treats the (sample-weighted) mean of the client deltas
``Delta_t = mean_k(w^k - w^t)`` as a gradient step and feeds it to an optimizer:

* :class:`FedAvgM` (Hsu, Qi & Brown 2019): ``v <- beta * v + Delta_t``, ``w <- w + eta * v``;
  ``beta = 0, eta = 1`` is FedAvg.
* :class:`FedAdam`: ``m <- b1 m + (1 - b1) Delta``, ``v <- b2 v + (1 - b2) Delta^2``,
  ``w <- w + eta * m / (sqrt(v) + tau)`` -- as in the paper, without Adam's bias correction
  (Flower's ``FedAdam`` adds one; ``bias_correction=True`` does the same).

Both are :class:`~labsupport.fl.aggregators.Aggregator` subclasses whose state (momentum, moments, the
step count) is saved with checkpoints as tensors. Integer buffers take the sample-weighted mean of the
clients' values (exact, :func:`~labsupport.fl.state.aggregate`). Chapter 03 compares them with FedProx
and SCAFFOLD under label skew (benchmark ``noniid_sweep``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .aggregators import Aggregator
from .clients import FitReply
from .state import StateDict, aggregate

__all__ = ["FedAdam", "FedAvgM", "pseudo_gradient"]


def pseudo_gradient(
    global_state: StateDict, replies: Sequence[FitReply]
) -> tuple[StateDict, StateDict]:
    """``(mean, delta)``: the weighted mean state and ``Delta = mean - global`` (float entries, float64)."""
    mean = aggregate([r.state for r in replies], [r.num_samples for r in replies])
    delta = {
        k: mean[k].double() - v.double() for k, v in global_state.items() if v.is_floating_point()
    }
    return mean, delta


def _check(name: str, value: float, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value >= high):
        raise ValueError(
            f"{name} must be in [{low}, {high if high is not None else 'inf'}), got {value}"
        )
    return float(value)


def _load(state: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {
        k[len(prefix) :]: v.detach().clone().to(torch.float64)
        for k, v in state.items()
        if k.startswith(prefix) and isinstance(v, torch.Tensor)
    }


class FedAvgM(Aggregator):
    """Server momentum: ``v <- momentum * v + Delta``, ``w <- w + server_lr * v``."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = _check("server_lr", server_lr, 0.0)
        self.momentum = _check("momentum", momentum, 0.0, 1.0)
        self.velocity: dict[str, torch.Tensor] = {}

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        mean, delta = pseudo_gradient(global_state, replies)
        for k, d in delta.items():
            self.velocity[k] = self.momentum * self.velocity[k] + d if k in self.velocity else d
        out = dict(mean)
        for k, v in self.velocity.items():
            ref = global_state[k]
            out[k] = (ref.double() + self.server_lr * v).to(ref.dtype)
        return out

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "server_lr": self.server_lr, "momentum": self.momentum}

    def state_dict(self) -> dict[str, Any]:
        return {f"velocity.{k}": v.clone() for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = [k for k in state if not k.startswith("velocity.")]
        if unknown:
            raise ValueError(f"FedAvgM state has unknown keys {unknown}")
        self.velocity = _load(state, "velocity.")


class FedAdam(Aggregator):
    """FedAdam (Reddi et al. 2021, Alg. 2): Adam on the server over the pseudo-gradient."""

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ) -> None:
        self.server_lr = _check("server_lr", server_lr, 0.0)
        self.beta1 = _check("beta1", beta1, 0.0, 1.0)
        self.beta2 = _check("beta2", beta2, 0.0, 1.0)
        self.tau = _check("tau", tau, 0.0)
        if self.tau == 0:
            raise ValueError("tau must be > 0 (it keeps the update finite where v = 0)")
        self.bias_correction = bool(bias_correction)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        mean, delta = pseudo_gradient(global_state, replies)
        self.steps += 1
        lr = self.server_lr
        if self.bias_correction:
            lr *= math.sqrt(1 - self.beta2**self.steps) / (1 - self.beta1**self.steps)
        out = dict(mean)
        for k, d in delta.items():
            m = self.m.get(k, torch.zeros_like(d))
            v = self.v.get(k, torch.zeros_like(d))
            self.m[k] = self.beta1 * m + (1 - self.beta1) * d
            self.v[k] = self.beta2 * v + (1 - self.beta2) * d * d
            ref = global_state[k]
            step = lr * self.m[k] / (self.v[k].sqrt() + self.tau)
            out[k] = (ref.double() + step).to(ref.dtype)
        return out

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "server_lr": self.server_lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "bias_correction": self.bias_correction,
        }

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"m.{k}": t.clone() for k, t in self.m.items()}
        out.update({f"v.{k}": t.clone() for k, t in self.v.items()})
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = [k for k in state if not (k.startswith(("m.", "v.")) or k == "steps")]
        if unknown:
            raise ValueError(f"FedAdam state has unknown keys {unknown}")
        self.m, self.v = _load(state, "m."), _load(state, "v.")
        if set(self.m) != set(self.v):
            raise ValueError("FedAdam state: first and second moments cover different entries")
        steps = state.get("steps", 0)
        self.steps = int(steps.item() if isinstance(steps, torch.Tensor) else steps)
