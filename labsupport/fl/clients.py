"""Clients: what a server hands them each round, what they send back, and the honest client.

McMahan et al. (2017), Algorithm 1, ``ClientUpdate(k, w)``: load the global weights, run ``E`` epochs
of mini-batch SGD (batch ``B``, learning rate ``lr``) on the client's ``n_k`` samples, return the
weights. The pieces every chapter's clients share:

* :class:`TrainConfig` -- the client-side training knobs (``E``, ``B``, ``lr``, optimizer); the
  server's own knobs (rounds, fraction, evaluation) never reach a client.
* :class:`RoundContext` -- what the server hands a client besides the model: the round, a seed
  derived from ``(seed, round, client)``, the round's cohort ``S_t``, and the server's instructions
  for this round (SCAFFOLD's control variate, FedProx's ``mu``, ...).
* :class:`FitReply` and :class:`Rejection` -- a client's answer, or the server's reason for refusing it.
* :class:`Client` -- the protocol: ``num_samples`` and ``fit(model, global_state, ctx, config)``.
* :class:`DataClient` -- the honest client holding ``(x, y)``. Chapters change its *local objective*
  by composition, not by subclassing: ``loss_fn`` (distillation), ``penalty`` (FedProx's proximal
  term), ``grad_hook`` (SCAFFOLD, per-sample clipping), ``batch_sampler`` (Poisson sampling). A
  ``DataClient`` with none of them set trains the plain objective, which is what vectorized training
  (:mod:`labsupport.fl.vectorized`) reproduces; any hook turns vectorized training off for it.
* :func:`fit_or_reject` -- run a client on *its own copies* of the global state (and, for clients
  that are not a plain ``DataClient``, of the scratch model), validate the reply, and return a
  :class:`FitReply` or a :class:`Rejection`. Whatever a client does to what it was handed -- modify
  it, then raise or return garbage -- cannot reach the server's model or another client.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from labsupport.train import TrainResult, train

from .state import StateDict, UpdateRejected, clone_state, validate_update

__all__ = [
    "Client",
    "DataClient",
    "FitReply",
    "Rejection",
    "RoundContext",
    "TrainConfig",
    "fit_or_reject",
    "local_update",
    "num_local_steps",
]

logger = logging.getLogger("labsupport.fl")


@dataclass(frozen=True)
class TrainConfig:
    """The client-side knobs of Algorithm 1: ``E`` (``local_epochs``), ``B`` and ``lr``.

    ``batch_size=None`` is the whole local dataset (B = inf): with ``local_epochs=1`` that is FedSGD.
    """

    local_epochs: int = 1
    batch_size: int | None = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclass(frozen=True)
class RoundContext:
    """What a client is told besides the model: round, client id, derived seed, cohort, instructions."""

    server_round: int
    client_id: int
    seed: int
    cohort: tuple[int, ...] = ()
    instructions: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class FitReply:
    """A client's answer: its new local state, its (claimed) sample count and its metrics."""

    state: StateDict
    num_samples: float
    metrics: dict[str, float] = field(default_factory=dict)
    client: int = -1


@dataclass(frozen=True)
class Rejection:
    """The server refused client ``client``'s reply in this round, for ``reason``."""

    client: int
    reason: str


@runtime_checkable
class Client(Protocol):
    """What the server needs of a client: its sample count and a ``fit``."""

    num_samples: int

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        """Train from ``global_state`` in ``model`` (a scratch module) and reply."""
        ...


def num_local_steps(num_samples: int, config: TrainConfig) -> int:
    """Mini-batch steps of one ``fit``: ``E * ceil(n_k / B)`` (``E`` for full-batch training)."""
    per_epoch = 1 if config.batch_size is None else -(-num_samples // config.batch_size)
    return per_epoch * config.local_epochs


def local_update(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int = 0,
    **hooks: Any,
) -> tuple[StateDict, TrainResult]:
    """ClientUpdate of Algorithm 1: load ``global_state`` into ``model``, train, return a CPU copy.

    ``hooks`` are passed to :func:`labsupport.train.train` (``loss_fn``, ``penalty``, ``grad_hook``,
    ``batch_sampler``, ``device``).
    """
    model.load_state_dict(global_state)
    result = train(
        model,
        x,
        y,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        momentum=config.momentum,
        generator=torch.Generator().manual_seed(seed),
        **{k: v for k, v in hooks.items() if v is not None},
    )
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, result


@dataclass
class DataClient:
    """An honest client holding ``(x, y)``; its local objective is changed through the hooks.

    Each hook, when set, receives what :func:`labsupport.train.train` passes it. To read the round's
    instructions (FedProx's ``mu``, SCAFFOLD's control variate), a hook may be a *factory*: set
    ``hooks_for_round(ctx, global_state) -> dict`` instead, returning the hooks for this round.
    """

    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    penalty: Callable[[nn.Module], torch.Tensor] | None = None
    grad_hook: Callable[[nn.Module], None] | None = None
    batch_sampler: Callable[[int, torch.Generator | None], Iterable[torch.Tensor]] | None = None
    hooks_for_round: Callable[[RoundContext, StateDict], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"client data has {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.x) == 0:
            raise ValueError("a client needs at least one sample")

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @property
    def plain(self) -> bool:
        """True when this client trains the unmodified objective (and can be vectorized)."""
        return type(self).fit is DataClient.fit and not any(
            getattr(self, h) is not None
            for h in ("loss_fn", "penalty", "grad_hook", "batch_sampler", "hooks_for_round")
        )

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        hooks = {
            "loss_fn": self.loss_fn,
            "penalty": self.penalty,
            "grad_hook": self.grad_hook,
            "batch_sampler": self.batch_sampler,
        }
        if self.hooks_for_round is not None:
            hooks.update(self.hooks_for_round(ctx, global_state))
        device = next((p.device for p in model.parameters()), None)
        x, y = self.x, self.y
        if device is not None and device.type != "cpu":
            hooks.setdefault("device", device)
        state, result = local_update(model, global_state, x, y, config, seed=ctx.seed, **hooks)
        return FitReply(
            state, self.num_samples, {"loss": result.loss, "steps": result.steps}, ctx.client_id
        )


def _is_plain_data_client(client: object) -> bool:
    """Our own code with no foreign hook: trusted to leave the scratch model as it found it."""
    return type(client) is DataClient and client.plain


def _copy_to_cpu(state: object, cid: int) -> StateDict:
    """A detached CPU copy of a reply's state, taken before it is validated: a client that keeps
    mutating the tensors it returned cannot change what the server checked and accepted."""
    if not isinstance(state, Mapping):
        raise UpdateRejected(f"update is a {type(state).__name__}; expected a state dict", cid)
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise UpdateRejected(f"{k!r} is a {type(v).__name__}; expected a tensor", cid)
        out[k] = v.detach().to("cpu", copy=True)
    return out


def fit_or_reject(
    client: Client,
    scratch: nn.Module,
    global_state: StateDict,
    ctx: RoundContext,
    config: TrainConfig,
) -> FitReply | Rejection:
    """Run ``client.fit`` on copies of what it is handed and validate its reply against ``global_state``.

    A plain :class:`DataClient` (our own code, no hooks) trains in ``scratch``; any other client --
    a hooked ``DataClient`` included, since a hook can freeze or rewire layers -- gets a deep copy of
    it, so a client that changes the model it was handed cannot affect the next one. The reply's
    state is copied before it is accepted (a client that returns a live ``state_dict()`` of a model it
    keeps cannot change it later). Returns a :class:`FitReply` (with ``client`` set to the id the
    server knows it by), or a :class:`Rejection` when the client raised or its reply failed
    :func:`~labsupport.fl.state.validate_update` -- logged, never fatal to the run.
    """
    cid = ctx.client_id
    ours = _is_plain_data_client(client)  # copies what it loads and returns, rewires nothing
    model = scratch if ours else copy.deepcopy(scratch)
    try:
        reply = client.fit(model, global_state if ours else clone_state(global_state), ctx, config)
        if not isinstance(reply, FitReply):
            raise UpdateRejected(f"fit returned a {type(reply).__name__}; expected a FitReply", cid)
        state = reply.state if ours else _copy_to_cpu(reply.state, cid)
        validate_update(global_state, state, reply.num_samples, client=cid)
        metrics = reply.metrics if isinstance(reply.metrics, Mapping) else {}
        clean = {
            str(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        accepted = FitReply(state, float(reply.num_samples), clean, cid)
    except Exception as exc:
        reason = exc.reason if isinstance(exc, UpdateRejected) else f"raised {exc!r}"
        logger.warning("round %d: rejected client %d: %s", ctx.server_round, cid, reason)
        return Rejection(cid, reason)
    return accepted
