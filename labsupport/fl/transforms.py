"""The update pipeline: transforms between a client's reply and the server's aggregator.

A client's update ``Δ_k = w_k - w_t`` (floating entries; integer buffers travel as values, see
:func:`~labsupport.fl.state.state_delta`) goes through a :class:`Pipeline` of
:class:`UpdateTransform` objects:

    client:   payload = T_n.encode( ... T_1.encode(Δ_k) ... )       -> serialized, bytes counted
    server:   Δ̂_k     = T_1.decode( ... T_n.decode(payload) ... )   -> w_t + Δ̂_k, validated again
    server:   w_{t+1} = aggregator(replies)  ->  T_1.finalize( ... T_n.finalize(w_{t+1}) ... )

Chapter 01's compressors (top-k with error feedback, stochastic quantization) are transforms;
chapter 02 adds update clipping and Gaussian noise (DP-FedAvg, McMahan et al. 2018: clip on the
client in ``encode``, noise on the average in ``finalize``) and secure-aggregation masking (Bonawitz
et al. 2017). Masked updates cannot be decoded one by one -- only their sum can -- so a transform
with ``sums_payloads = True`` replaces the per-client decode *and* the aggregator with
:meth:`UpdateTransform.aggregate_payloads`; the server then refuses any aggregator but the weighted
mean, which is the point chapter 02 makes: secure aggregation hides the updates a robust aggregator
or a validator would need to see.

A transform that cannot encode or decode an update (an overflow in quantization, a payload of the
wrong length) raises ``ValueError``: that client is rejected with the message and the round goes
on. Transforms with state (error-feedback residuals, an RNG counter, a privacy ledger) save it with
the server's checkpoints (:meth:`UpdateTransform.state_dict`, tensors and JSON values only), and
their :meth:`UpdateTransform.config` is part of the checkpoint fingerprint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .clients import RoundContext
from .state import StateDict, Stateful

__all__ = ["Pipeline", "RoundAborted", "UpdateTransform"]

Payload = dict[str, torch.Tensor]


class RoundAborted(RuntimeError):
    """A round-level transform cannot produce this round's aggregate (e.g. secure aggregation with
    fewer survivors than its threshold). The server keeps the global model and records why."""


class UpdateTransform(Stateful):
    """One stage of the pipeline. The defaults are identities, so a subclass overrides what it needs."""

    #: True when only the sum of all clients' payloads can be decoded (secure aggregation).
    sums_payloads: bool = False

    def encode(self, delta: Mapping[str, torch.Tensor], ctx: RoundContext) -> Payload:
        """Client side: turn the update (or the previous stage's payload) into this stage's payload."""
        return dict(delta)

    def decode(
        self, payload: Mapping[str, torch.Tensor], ctx: RoundContext, global_state: StateDict
    ) -> Payload:
        """Server side, per client: invert :meth:`encode` (raise ``ValueError`` to reject)."""
        return dict(payload)

    def aggregate_payloads(
        self,
        payloads: Mapping[int, Mapping[str, torch.Tensor]],
        weights: Mapping[int, float],
        server_round: int,
        global_state: StateDict,
    ) -> Payload:
        """Server side, ``sums_payloads`` transforms only: the weighted mean of the decoded updates."""
        raise NotImplementedError(f"{type(self).__name__} does not aggregate payloads")

    def finalize(
        self, global_state: StateDict, new_state: StateDict, server_round: int
    ) -> StateDict:
        """Server side, after aggregation (server-side DP noise goes here)."""
        return new_state


class Pipeline:
    """Transforms applied in order on the client and in reverse on the server. Empty = identity."""

    def __init__(self, transforms: Sequence[UpdateTransform] = ()) -> None:
        for i, t in enumerate(transforms):
            if not isinstance(t, UpdateTransform):
                raise TypeError(
                    f"transform {i} is a {type(t).__name__}; expected an UpdateTransform"
                )
        summing = [i for i, t in enumerate(transforms) if t.sums_payloads]
        if summing and summing != [len(transforms) - 1]:
            raise ValueError(
                "a transform that only decodes a sum (secure aggregation) must come last in the "
                f"pipeline; got it at position(s) {summing} of {len(transforms)}"
            )
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __bool__(self) -> bool:
        return bool(self.transforms)

    @property
    def sums_payloads(self) -> bool:
        return bool(self.transforms) and self.transforms[-1].sums_payloads

    def encode(self, delta: Mapping[str, torch.Tensor], ctx: RoundContext) -> Payload:
        payload = dict(delta)
        for t in self.transforms:
            payload = t.encode(payload, ctx)
        return payload

    def decode(
        self,
        payload: Mapping[str, torch.Tensor],
        ctx: RoundContext,
        global_state: StateDict,
        *,
        skip_last: bool = False,
    ) -> Payload:
        stages = self.transforms[:-1] if skip_last else self.transforms
        out = dict(payload)
        for t in reversed(stages):
            out = t.decode(out, ctx, global_state)
        return out

    def finalize(
        self, global_state: StateDict, new_state: StateDict, server_round: int
    ) -> StateDict:
        for t in reversed(self.transforms):
            new_state = t.finalize(global_state, new_state, server_round)
        return new_state

    def config(self) -> list[dict[str, Any]]:
        return [t.config() for t in self.transforms]

    def state_dict(self) -> list[dict[str, Any]]:
        return [t.state_dict() for t in self.transforms]

    def load_state_dict(self, states: Sequence[Mapping[str, Any]]) -> None:
        if len(states) != len(self.transforms):
            raise ValueError(
                f"checkpoint holds state for {len(states)} transforms; this pipeline has "
                f"{len(self.transforms)}"
            )
        for t, s in zip(self.transforms, states, strict=True):
            t.load_state_dict(s)
