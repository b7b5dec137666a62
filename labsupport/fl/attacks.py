"""Malicious clients: the attacks chapter 03's robust aggregators are measured against.

Each attack is a client (it implements the :class:`~labsupport.fl.clients.Client` protocol), so the
server runs it like any other and cannot tell it apart except by what it sends. Most wrap an honest
:class:`~labsupport.fl.clients.DataClient` -- the attacker trains on real data, then lies about the
result -- so attacks compose (a label-flipping client with a boosted update is model replacement).

* :class:`SignFlipClient` -- sends ``w - scale * Delta`` instead of ``w + Delta`` (the reversed
  update; Blanchard et al. 2017 and Fang et al., "Local model poisoning attacks to Byzantine-robust
  federated learning", USENIX Security 2020, use such "inverted gradients").
* :class:`ScaledUpdateClient` -- sends ``w + boost * Delta`` of the client it wraps: with a
  label-flipping client inside it is model replacement (Bagdasaryan et al., "How to backdoor federated
  learning", AISTATS 2020), scaled so that averaging cannot dilute it.
* :class:`GaussianNoiseClient` -- sends ``w + N(0, std^2)`` (a Byzantine client of Blanchard et al.).
* :class:`LabelFlipClient` -- trains honestly on labels ``y -> C - 1 - y`` (data poisoning; Tolpegin
  et al., "Data poisoning attacks against federated learning systems", ESORICS 2020).
* :class:`FreeRiderClient` -- returns the global model unchanged and claims its samples (free riding,
  Lin et al. 2019): harmless to robust aggregators' accuracy, but takes weight and credit.
* :class:`SampleCountLiar` / :class:`LossLiar` -- report a huge sample count (which takes over the
  weighted mean, :class:`~labsupport.fl.aggregators.CountPolicy` is the answer) or a near-zero loss
  (which takes over the naive 1/loss weighting, :class:`~labsupport.fl.robust.InverseLossWeighting`).

:func:`make_attackers` turns a fraction of a federation's clients into attackers, the benchmark
``robust_attacks`` and notebook ``03_non_iid`` use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .clients import Client, DataClient, FitReply, RoundContext, TrainConfig
from .state import StateDict

__all__ = [
    "ATTACKS",
    "FreeRiderClient",
    "GaussianNoiseClient",
    "LabelFlipClient",
    "LossLiar",
    "SampleCountLiar",
    "ScaledUpdateClient",
    "SignFlipClient",
    "make_attackers",
    "malicious_ids",
]


def _scaled(global_state: StateDict, state: StateDict, factor: float) -> StateDict:
    """``global + factor * (state - global)`` on floating entries; other entries as ``state``."""
    return {
        k: (g.double() + factor * (state[k].double() - g.double())).to(g.dtype)
        if g.is_floating_point()
        else state[k].clone()
        for k, g in global_state.items()
    }


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


@dataclasses.dataclass
class _Wrapper:
    client: Client

    @property
    def num_samples(self) -> int:
        return self.client.num_samples


@dataclasses.dataclass
class SignFlipClient(_Wrapper):
    """Trains honestly, then sends ``global - scale * Delta`` (the reversed, scaled update)."""

    scale: float = 4.0

    def __post_init__(self) -> None:
        _check_positive("scale", self.scale)

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        reply = self.client.fit(model, global_state, ctx, config)
        return dataclasses.replace(reply, state=_scaled(global_state, reply.state, -self.scale))


@dataclasses.dataclass
class ScaledUpdateClient(_Wrapper):
    """Sends ``global + boost * Delta`` of the wrapped client (model replacement when it is poisoned)."""

    boost: float = 10.0

    def __post_init__(self) -> None:
        _check_positive("boost", self.boost)

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        reply = self.client.fit(model, global_state, ctx, config)
        return dataclasses.replace(reply, state=_scaled(global_state, reply.state, self.boost))


@dataclasses.dataclass
class LabelFlipClient(_Wrapper):
    """Trains on flipped labels ``y -> num_classes - 1 - y`` (its data is poisoned, its code honest)."""

    num_classes: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.client, DataClient):
            raise TypeError(f"LabelFlipClient wraps a DataClient, got {type(self.client).__name__}")
        if int(self.client.y.max()) >= self.num_classes:
            raise ValueError(
                f"labels reach {int(self.client.y.max())}; num_classes={self.num_classes}"
            )
        self._poisoned = dataclasses.replace(self.client, y=self.num_classes - 1 - self.client.y)

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        return self._poisoned.fit(model, global_state, ctx, config)


@dataclasses.dataclass
class GaussianNoiseClient:
    """Sends ``global + N(0, std^2)`` on every floating entry (noise seeded by ``ctx.seed``)."""

    num_samples: int
    std: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("std", self.std)

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        gen = torch.Generator().manual_seed(ctx.seed)
        state = {
            k: (v + self.std * torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype))
            if v.is_floating_point()
            else v.clone()
            for k, v in global_state.items()
        }
        return FitReply(state, self.num_samples, {"loss": 1.0, "steps": 1.0}, ctx.client_id)


@dataclasses.dataclass
class FreeRiderClient:
    """Returns the global model unchanged, claims ``num_samples`` and a plausible loss: no work done."""

    num_samples: int
    reported_loss: float = 1.0

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        state = {k: v.clone() for k, v in global_state.items()}
        return FitReply(
            state, self.num_samples, {"loss": self.reported_loss, "steps": 1.0}, ctx.client_id
        )


@dataclasses.dataclass
class SampleCountLiar(_Wrapper):
    """Replies as the wrapped client but claims ``claimed`` samples (default a million)."""

    claimed: float = 1e6

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        reply = self.client.fit(model, global_state, ctx, config)
        return dataclasses.replace(reply, num_samples=self.claimed)


@dataclasses.dataclass
class LossLiar(_Wrapper):
    """Replies as the wrapped client but reports ``metrics["loss"] = reported_loss`` (near zero)."""

    reported_loss: float = 1e-9

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        reply = self.client.fit(model, global_state, ctx, config)
        return dataclasses.replace(reply, metrics={**reply.metrics, "loss": self.reported_loss})


ATTACKS: dict[str, Callable[[DataClient], Client]] = {
    "sign_flip": lambda c: SignFlipClient(c),
    "scaled_update": lambda c: ScaledUpdateClient(LabelFlipClient(c), boost=10.0),
    "gaussian": lambda c: GaussianNoiseClient(c.num_samples, std=1.0),
    "label_flip": lambda c: LabelFlipClient(c),
    "free_rider": lambda c: FreeRiderClient(c.num_samples),
    "count_liar": lambda c: SampleCountLiar(SignFlipClient(c, scale=1.0)),
    "loss_liar": lambda c: LossLiar(SignFlipClient(c, scale=1.0)),
}


def malicious_ids(num_clients: int, fraction: float, seed: int = 0) -> list[int]:
    """``round(fraction * num_clients)`` distinct client ids, drawn with ``seed`` (sorted)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = round(fraction * num_clients)
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())


def make_attackers(
    clients: Sequence[DataClient],
    attack: str | Callable[[DataClient], Client],
    fraction: float,
    *,
    seed: int = 0,
) -> tuple[list[Any], list[int]]:
    """Replace a ``fraction`` of ``clients`` by attackers built by ``attack`` (a name of
    :data:`ATTACKS` or a factory); returns the new client list and the attackers' ids."""
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; expected one of {sorted(ATTACKS)}")
        attack = ATTACKS[attack]
    bad = malicious_ids(len(clients), fraction, seed)
    out: list[Any] = list(clients)
    for i in bad:
        out[i] = attack(clients[i])
    return out, bad
