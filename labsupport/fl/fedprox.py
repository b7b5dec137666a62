"""FedProx: a proximal term in each client's local objective, and partial work from stragglers.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated optimization in heterogeneous networks"
(MLSys 2020), eq. (2): client ``k`` approximately minimizes

    h_k(w; w^t) = F_k(w) + (mu / 2) * ||w - w^t||^2

from the global model ``w^t``. Both halves of the paper are here, and chapter 03 uses both
(notebook ``03_non_iid``, benchmark ``noniid_sweep``):

* the **proximal term**, through :class:`~labsupport.fl.clients.DataClient`'s hooks
  (:func:`fedprox_hooks` as its ``hooks_for_round``). The global parameters are held **once per
  round** as detached tensors keyed by parameter name -- never a rebuilt copy of the model (the naive
  ``type(model)()`` per batch needs an argument-free constructor, costs a model construction per step,
  and lets autograd track the copy). ``mu`` is fixed, or read each round from the server's
  instructions (``ctx.instructions["proximal_mu"]``, the key Flower's FedProx sends).
* **partial work** (the paper's gamma-inexact solutions, Section 3): a straggler returns what it
  managed -- fewer local steps -- instead of being dropped. :class:`StragglerClient` wraps a client
  and stops it after ``max_steps`` mini-batches (a number, or a function of the round context).

The server side of FedProx is FedAvg's weighted mean (:class:`~labsupport.fl.aggregators.WeightedMean`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .clients import DataClient, FitReply, RoundContext, TrainConfig
from .state import StateDict

__all__ = [
    "MU_KEY",
    "StragglerClient",
    "fedprox_hooks",
    "limited_batches",
    "proximal_grad_hook",
    "proximal_penalty",
    "proximal_term",
]

MU_KEY = "proximal_mu"


def _check_mu(mu: Any) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise TypeError(f"mu must be a number >= 0, got {mu!r}")
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    return float(mu)


def proximal_term(model: nn.Module, anchors: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """``(mu / 2) * sum_p ||p - anchors[name(p)]||^2`` over the model's parameters.

    ``anchors`` are the global parameters (detached); a parameter missing from them is an error.
    """
    total = None
    for name, p in model.named_parameters():
        if name not in anchors:
            raise KeyError(f"parameter {name!r} has no global value to stay close to")
        term = (p - anchors[name]).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no parameters")
    return 0.5 * mu * total


def proximal_penalty(
    global_state: Mapping[str, torch.Tensor], mu: float
) -> Callable[[nn.Module], torch.Tensor]:
    """A ``penalty(model)`` hook holding the global parameters once (detached, moved lazily)."""
    mu = _check_mu(mu)
    anchors = {k: v.detach().clone() for k, v in global_state.items() if v.is_floating_point()}
    moved: dict[str, torch.Tensor] = {}

    def penalty(model: nn.Module) -> torch.Tensor:
        if not moved:
            device = next(model.parameters()).device
            moved.update({k: v.to(device) for k, v in anchors.items()})
        return proximal_term(model, moved, mu)

    return penalty


def proximal_grad_hook(
    global_state: Mapping[str, torch.Tensor], mu: float
) -> Callable[[nn.Module], None]:
    """A ``grad_hook(model)`` adding the proximal term's gradient ``mu * (w - w^t)`` to every ``.grad``.

    The same local objective as :func:`proximal_penalty` (the gradient of ``(mu/2)||w - w^t||^2``),
    without building the term in the autograd graph: about half the cost per step on a small MLP.
    The reported training loss is then the data loss alone.
    """
    mu = _check_mu(mu)
    anchors = {k: v.detach().clone() for k, v in global_state.items() if v.is_floating_point()}
    moved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def hook(model: nn.Module) -> None:
        if not moved:
            device = next(model.parameters()).device
            moved.update({k: v.to(device) for k, v in anchors.items()})
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(p - moved[name], alpha=mu)

    return hook


def fedprox_hooks(
    mu: float | None = None, *, mu_key: str = MU_KEY, form: str = "loss"
) -> Callable[[RoundContext, StateDict], dict[str, Any]]:
    """``hooks_for_round`` for a :class:`DataClient`: the proximal term of this round.

    With ``mu=None`` it is read from ``ctx.instructions[mu_key]`` (a missing key is an error: a
    FedProx client must know its ``mu``); otherwise it is fixed. ``mu = 0`` adds nothing (FedAvg).
    ``form="loss"`` adds the term to the loss (``penalty`` hook, eq. 2 as written);
    ``form="gradient"`` adds its gradient after ``backward()`` (``grad_hook``), the same objective
    for plain SGD at about half the cost.
    """
    fixed = None if mu is None else _check_mu(mu)
    if form not in ("loss", "gradient"):
        raise ValueError(f"form must be 'loss' or 'gradient', got {form!r}")

    def hooks(ctx: RoundContext, global_state: StateDict) -> dict[str, Any]:
        if fixed is None:
            if mu_key not in ctx.instructions:
                raise KeyError(
                    f"round {ctx.server_round}: no {mu_key!r} in the server's instructions "
                    f"(got {sorted(ctx.instructions)}); pass mu= or have the server send it"
                )
            value = _check_mu(ctx.instructions[mu_key])
        else:
            value = fixed
        if value == 0:
            return {}
        if form == "gradient":
            return {"grad_hook": proximal_grad_hook(global_state, value)}
        return {"penalty": proximal_penalty(global_state, value)}

    return hooks


def limited_batches(
    batch_size: int | None, max_steps: int
) -> Callable[[int, torch.Generator | None], Iterator[torch.Tensor]]:
    """A ``batch_sampler`` that yields shuffled batches until ``max_steps`` in total, then none.

    Stateful across epochs (one sampler per fit): epochs after the budget is spent are empty.
    """
    from labsupport.train import batch_indices

    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    left = [max_steps]

    def sampler(n: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        for idx in batch_indices(n, batch_size, generator):
            if left[0] <= 0:
                return
            left[0] -= 1
            yield idx

    return sampler


@dataclasses.dataclass
class StragglerClient:
    """A :class:`DataClient` that stops after ``max_steps`` local steps (FedProx's partial work).

    ``max_steps`` is an int or ``f(ctx) -> int`` (e.g. a random budget per round from ``ctx.seed``).
    The reply reports the steps actually taken in ``metrics["steps"]``. At least one step is taken:
    a straggler with a zero budget would return the global model unchanged.
    """

    client: DataClient
    max_steps: int | Callable[[RoundContext], int]

    @property
    def num_samples(self) -> int:
        return self.client.num_samples

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        budget = self.max_steps(ctx) if callable(self.max_steps) else self.max_steps
        budget = max(1, int(budget))
        limited = dataclasses.replace(
            self.client, batch_sampler=limited_batches(config.batch_size, budget)
        )
        return limited.fit(model, global_state, ctx, config)
