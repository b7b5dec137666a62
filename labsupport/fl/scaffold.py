"""SCAFFOLD: control variates that correct client drift under non-IID data.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic controlled averaging for
federated learning" (ICML 2020), Algorithm 1. Each local step of client ``i`` uses the corrected
gradient ``g_i(y) + c - c_i``; after ``K`` steps of learning rate ``eta_l`` it updates its control
variate with **option II**

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)

and the server updates ``x <- x + eta_g * mean_i(y_i - x)``, ``c <- c + (|S| / N) * mean_i(c_i+ - c_i)``.

* :class:`Scaffold` -- the server side, an :class:`~labsupport.fl.aggregators.Aggregator`: ``c`` is
  its state (tensors, checkpointed) and is sent to every client of a round through
  :meth:`Scaffold.instructions` (``ctx.instructions["scaffold_c"]``).
* :class:`ScaffoldClient` -- wraps a :class:`~labsupport.fl.clients.DataClient`: keeps its own
  ``c_i`` (tensors, :meth:`ScaffoldClient.state_dict`), adds the correction through ``grad_hook`` and
  applies option II after its fit.

With option II, ``c_i+ - c_i = -c + (x - y_i) / (K eta_l)`` is a function of what the server already
has -- ``c``, ``x``, the client's model ``y_i`` and its step count ``K`` (``metrics["steps"]``) -- so
the server computes it instead of receiving a second upload (the paper uploads it; the values are
identical). Option II assumes plain SGD locally (no momentum, no Adam): both sides check that.
Chapter 03 compares SCAFFOLD with FedAvg and FedProx under label skew (benchmark ``noniid_sweep``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .aggregators import Aggregator
from .clients import DataClient, FitReply, RoundContext, TrainConfig
from .state import StateDict, aggregate

__all__ = ["C_KEY", "Scaffold", "ScaffoldClient", "control_variate_update"]

C_KEY = "scaffold_c"


def control_variate_update(
    c_i: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """Option II: ``c_i+ = c_i - c + (x - y) / (steps * lr)`` for every key of ``c`` (float64)."""
    if steps < 1:
        raise ValueError(f"option II needs at least one local step, got steps={steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    scale = 1.0 / (steps * lr)
    return {k: c_i[k].double() - c[k].double() + (x[k].double() - y[k].double()) * scale for k in c}


def _zeros_like_float(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: torch.zeros_like(v, dtype=torch.float64)
        for k, v in state.items()
        if v.is_floating_point()
    }


class Scaffold(Aggregator):
    """SCAFFOLD's server: ``x <- x + global_lr * mean(y_i - x)``, ``c <- c + |S|/N mean(dc_i)``.

    ``num_clients`` is ``N`` (all clients); ``local_lr`` is the clients' ``eta_l`` (their
    ``TrainConfig.lr``), needed for option II. The model update uses the sample-weighted mean (as
    FedAvg); the control variate the plain mean, as in the paper.
    """

    def __init__(self, num_clients: int, local_lr: float, global_lr: float = 1.0) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if not local_lr > 0 or not global_lr > 0:
            raise ValueError(f"local_lr and global_lr must be > 0, got {local_lr}, {global_lr}")
        self.num_clients, self.local_lr, self.global_lr = (
            int(num_clients),
            float(local_lr),
            float(global_lr),
        )
        self.c: dict[str, torch.Tensor] = {}

    def _ensure(self, global_state: StateDict) -> None:
        if not self.c:
            self.c = _zeros_like_float(global_state)

    def instructions(self, server_round: int, global_state: StateDict) -> dict[str, Any]:
        self._ensure(global_state)
        return {C_KEY: {k: v.clone() for k, v in self.c.items()}}

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        self._ensure(global_state)
        mean = aggregate([r.state for r in replies], [r.num_samples for r in replies])
        out = dict(mean)
        for k in self.c:
            ref = global_state[k]
            out[k] = (ref.double() + self.global_lr * (mean[k].double() - ref.double())).to(
                ref.dtype
            )
        # dc_i = c_i+ - c_i = (x - y_i) / (K_i lr) - c  (option II; c_i cancels). A reply without a
        # positive step count contributes dc_i = 0 (it cannot have followed the protocol).
        dc_sum = {k: torch.zeros_like(v) for k, v in self.c.items()}
        for r in replies:
            steps = r.metrics.get("steps", 0)
            if not steps >= 1:
                continue
            scale = 1.0 / (int(steps) * self.local_lr)
            for k in dc_sum:
                dc_sum[k] += (global_state[k].double() - r.state[k].double()) * scale - self.c[k]
        frac = len(replies) / self.num_clients
        for k in self.c:
            self.c[k] = self.c[k] + frac * dc_sum[k] / len(replies)
        return out

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "num_clients": self.num_clients,
            "local_lr": self.local_lr,
            "global_lr": self.global_lr,
        }

    def state_dict(self) -> dict[str, Any]:
        return {f"c.{k}": v.clone() for k, v in self.c.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = [k for k in state if not k.startswith("c.")]
        if unknown:
            raise ValueError(f"Scaffold state has unknown keys {unknown}")
        self.c = {k[2:]: v.detach().clone().double() for k, v in state.items()}


@dataclass
class ScaffoldClient:
    """A client running SCAFFOLD's local step: gradient ``g + c - c_i``, then option II for ``c_i``.

    ``c_i`` starts at zero and lives here across rounds (:meth:`state_dict` to save it). The wrapped
    client's own hooks (other than ``grad_hook``) still apply.
    """

    client: DataClient
    c_i: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.client.num_samples

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        if config.optimizer != "sgd" or config.momentum != 0:
            raise ValueError(
                f"SCAFFOLD's option II assumes plain SGD; got optimizer={config.optimizer!r}, "
                f"momentum={config.momentum}"
            )
        if C_KEY not in ctx.instructions:
            raise KeyError(f"round {ctx.server_round}: the server sent no {C_KEY!r} (use Scaffold)")
        c = ctx.instructions[C_KEY]
        if not self.c_i:
            self.c_i = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c.items()}
        names = {n for n, _ in model.named_parameters()}
        missing = names - set(c)
        if missing:
            raise KeyError(f"the server's control variate lacks parameters {sorted(missing)}")
        device = next(model.parameters()).device
        correction = {n: (c[n].double() - self.c_i[n]).to(device) for n in names}

        def grad_hook(m: nn.Module) -> None:
            for n, p in m.named_parameters():
                if p.grad is not None:
                    p.grad.add_(correction[n].to(p.grad.dtype))

        inner = self.client
        if inner.hooks_for_round is not None or inner.grad_hook is not None:
            raise ValueError("ScaffoldClient sets grad_hook itself; wrap a client without one")
        corrected = DataClient(
            inner.x,
            inner.y,
            loss_fn=inner.loss_fn,
            penalty=inner.penalty,
            grad_hook=grad_hook,
            batch_sampler=inner.batch_sampler,
        )
        reply = corrected.fit(model, global_state, ctx, config)
        steps = int(reply.metrics["steps"])
        if steps > 0:
            self.c_i = control_variate_update(
                self.c_i, c, global_state, reply.state, steps, config.lr
            )
        return reply

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.c_i.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.c_i = {k: v.detach().clone().double() for k, v in state.items()}
