"""FedAvg's parts: client selection, the client's local update, validation and weighted averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017), Algorithm 1. Each round the server picks ``m = max(C * K, 1)`` of the ``K`` clients,
each client ``k`` runs ``E`` epochs of mini-batch SGD (batch ``B``, learning rate ``lr``) from the global
weights ``w_t`` on its ``n_k`` samples, and the server averages

    w_{t+1} = sum_k (n_k / n) * w^k_{t+1},     n = sum_k n_k                       (Algorithm 1)

FedSGD is the special case ``E = 1, B = inf`` (``batch_size=None``): one full-batch gradient step.

Everything works on state dicts, so it covers every entry of a model -- parameters and buffers,
any floating dtype, and integer buffers such as BatchNorm's ``num_batches_tracked``. Updates are
validated before they are averaged (:func:`validate_update`): a bad client is rejected with a message
that says what was wrong, never averaged into the global model. The simulation loop is in
:mod:`labsupport.fl.simulation`; chapter 01 builds it up from these parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from labsupport.train import TrainResult, train

__all__ = [
    "StateDict",
    "UpdateRejected",
    "aggregate",
    "client_seed",
    "clone_state",
    "local_update",
    "mix_states",
    "num_selected",
    "select_clients",
    "validate_update",
]

StateDict = dict[str, torch.Tensor]


class UpdateRejected(ValueError):
    """A client's update failed validation; ``client`` names the client (or is None)."""

    def __init__(self, message: str, client: object = None) -> None:
        prefix = f"client {client} " if client is not None else ""
        super().__init__(prefix + message)
        self.client = client


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached copy of a state dict (what a client sends, what the server keeps)."""
    return {k: v.detach().clone() for k, v in state.items()}


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """The seed of client ``client_id``'s batch order in ``server_round``.

    Derived, not drawn from a running generator: any round can be replayed on its own, which makes
    checkpoint/resume exact and lets Flower's clients (chapter 01) reproduce our simulator's batches.
    """
    return int(np.random.SeedSequence([seed, server_round, client_id]).generate_state(1)[0])


def num_selected(num_clients: int, fraction: float, min_clients: int = 1) -> int:
    """``m = max(C * K, min_clients)`` clients per round, ``C * K`` rounded half up, at most ``K``."""
    return min(num_clients, max(math.floor(fraction * num_clients + 0.5), min_clients))


def select_clients(
    num_clients: int,
    fraction: float,
    *,
    min_clients: int = 1,
    seed: int = 0,
    server_round: int = 1,
) -> list[int]:
    """Sample ``m = max(C * K, min_clients)`` distinct clients (C * K rounded half up), sorted.

    Seeded by ``(seed, server_round)``: the same round always selects the same clients.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not 1 <= min_clients <= num_clients:
        raise ValueError(
            f"min_clients must be in [1, num_clients={num_clients}], got {min_clients}"
        )
    m = num_selected(num_clients, fraction, min_clients)
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


def local_update(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int | None = 10,
    lr: float = 0.05,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> tuple[StateDict, TrainResult]:
    """ClientUpdate of Algorithm 1: load ``global_state`` into ``model``, train ``epochs`` epochs.

    ``model`` is a scratch module whose weights are overwritten. Returns the new state dict (a copy)
    and what training did. ``batch_size=None`` is full-batch gradient descent (FedSGD).
    """
    model.load_state_dict(global_state)
    result = train(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        generator=torch.Generator().manual_seed(seed),
        penalty=penalty,
    )
    return clone_state(model.state_dict()), result


def validate_update(
    global_state: Mapping[str, torch.Tensor],
    update: object,
    weight: object,
    client: object = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` can be averaged into ``global_state``.

    Checks: a mapping with exactly the global model's keys; every entry a tensor of the same shape and
    dtype; floating entries finite; ``weight`` (the sample count) a finite number > 0.
    """
    if not isinstance(weight, (int, float, np.integer, np.floating)) or isinstance(weight, bool):
        raise UpdateRejected(
            f"weight {weight!r} is not a number; expected the sample count", client
        )
    if not math.isfinite(float(weight)) or float(weight) <= 0:
        raise UpdateRejected(f"weight {weight!r} must be a finite number > 0", client)
    if not isinstance(update, Mapping):
        raise UpdateRejected(f"update is a {type(update).__name__}; expected a state dict", client)
    missing = [k for k in global_state if k not in update]
    extra = [k for k in update if k not in global_state]
    if missing or extra:
        raise UpdateRejected(
            f"update keys differ from the global model's: missing {missing}, unexpected {extra}",
            client,
        )
    for key, ref in global_state.items():
        value = update[key]
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(f"{key!r} is a {type(value).__name__}; expected a tensor", client)
        if value.shape != ref.shape:
            raise UpdateRejected(
                f"update has shape {tuple(value.shape)} for {key!r}; the global model has {tuple(ref.shape)}",
                client,
            )
        if value.dtype != ref.dtype:
            raise UpdateRejected(
                f"update has dtype {value.dtype} for {key!r}; the global model has {ref.dtype}",
                client,
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UpdateRejected(f"{key!r} holds {bad} non-finite value(s) (NaN or inf)", client)


def mix_states(
    states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor
) -> list[StateDict]:
    """Weighted combinations of state dicts: output ``i`` is ``sum_j weights[i, j] * states[j]``.

    The one mixing rule shared by FedAvg (one row of normalized sample counts) and gossip (a mixing
    matrix, :mod:`labsupport.fl.decentralized`). Floating entries are combined in float64 and cast back
    to their own dtype (float16/bfloat16 included); integer entries (e.g. ``num_batches_tracked``) are
    rounded to the nearest integer; boolean entries take the weighted majority.
    """
    w = weights.to(torch.float64)
    out: list[StateDict] = [{} for _ in range(w.shape[0])]
    for key, ref in states[0].items():
        stacked = torch.stack([s[key].detach().to(torch.float64) for s in states])
        mixed = torch.tensordot(w, stacked, dims=1)
        if ref.dtype == torch.bool:
            mixed = mixed >= 0.5
        elif ref.is_floating_point() or ref.is_complex():
            mixed = mixed.to(ref.dtype)
        else:
            mixed = torch.round(mixed).to(ref.dtype)
        for i in range(w.shape[0]):
            out[i][key] = mixed[i].clone() if w.shape[0] > 1 else mixed[i]
    return out


def aggregate(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted average ``sum_k w_k * state_k / sum_k w_k`` of every entry of the state dicts.

    Dtypes are kept as :func:`mix_states` describes. Inputs are not validated here -- call
    :func:`validate_update` on each client's update first -- except for the weights.
    """
    if len(states) == 0:
        raise ValueError("cannot aggregate an empty round: no client updates were given")
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    return mix_states(states, (w / w.sum())[None, :])[0]
