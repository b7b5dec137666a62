"""The server's aggregation step as a pluggable, stateful object.

FedAvg's aggregation (McMahan et al. 2017, Algorithm 1) is the sample-weighted mean of the accepted
replies, :class:`WeightedMean`. Later chapters replace it without touching the server loop:

* robust aggregators -- median, trimmed mean, Krum, geometric median (chapter 03) -- look at every
  client's update at once;
* server optimizers -- FedAvgM, FedAdam (Reddi et al. 2021) -- and SCAFFOLD (Karimireddy et al. 2020)
  keep state across rounds (momentum, control variates), saved with checkpoints through
  :meth:`Aggregator.state_dict` / :meth:`Aggregator.load_state_dict`;
* SCAFFOLD also sends clients something each round: :meth:`Aggregator.instructions` becomes the
  ``instructions`` of every client's :class:`~labsupport.fl.clients.RoundContext`.

An aggregator's identity (:meth:`Aggregator.config`) is part of a checkpoint's fingerprint: resuming
with a different aggregator is refused. The same objects run inside Flower through
:mod:`labsupport.flower.bridge`.

Sample counts are *claims*: a client that reports a million samples takes over the weighted mean.
:class:`CountPolicy` is the server's answer -- cap the claims, or use the counts registered when the
client joined -- applied before any aggregator sees the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .clients import FitReply
from .state import StateDict, Stateful, aggregate

__all__ = ["Aggregator", "CountPolicy", "WeightedMean"]


class Aggregator(Stateful):
    """Base class: ``aggregate(global_state, replies) -> new global state``; stateless by default.

    Subclasses override :meth:`aggregate`, and those with state also :meth:`state_dict` /
    :meth:`load_state_dict` (tensors and JSON values only: checkpoints hold no pickle).
    ``replies`` are validated :class:`~labsupport.fl.clients.FitReply` objects (finite, right keys,
    shapes and dtypes, positive weights); ``global_state`` is the model the clients started from.
    """

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        raise NotImplementedError

    def instructions(self, server_round: int, global_state: StateDict) -> dict[str, Any]:
        """What every client of ``server_round`` is told (empty unless the method needs it)."""
        return {}


class WeightedMean(Aggregator):
    """FedAvg: ``w_{t+1} = sum_k (n_k / n) w^k``, ``n = sum_{k in S_t} n_k`` (over accepted replies)."""

    def aggregate(self, global_state: StateDict, replies: Sequence[FitReply]) -> StateDict:
        return aggregate([r.state for r in replies], [r.num_samples for r in replies])


@dataclass
class CountPolicy:
    """How the server turns a client's *claimed* sample count into its weight.

    * ``"claimed"`` -- trust the claim (plain FedAvg; one liar takes over the mean);
    * ``"cap"`` -- ``min(claim, cap)``;
    * ``"registered"`` -- the count recorded for the client when it joined (``registered[client]``);
      a claim above it is logged in the round's record but never raises the weight.
    """

    mode: str = "claimed"
    cap: float | None = None
    registered: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("claimed", "cap", "registered"):
            raise ValueError(f"mode must be 'claimed', 'cap' or 'registered', got {self.mode!r}")
        if self.mode == "cap" and not (self.cap is not None and self.cap > 0):
            raise ValueError(f"mode='cap' needs cap > 0, got {self.cap!r}")
        if self.mode == "registered" and not self.registered:
            raise ValueError("mode='registered' needs the registered counts {client: n_k}")

    def weight(self, client: int, claimed: float) -> float:
        if self.mode == "cap":
            return min(claimed, float(self.cap))
        if self.mode == "registered":
            if client not in self.registered:
                raise ValueError(f"client {client} has no registered sample count")
            return float(self.registered[client])
        return claimed

    def config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "cap": self.cap,
            "registered": {str(k): v for k, v in sorted(self.registered.items())},
        }
