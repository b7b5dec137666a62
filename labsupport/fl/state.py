"""State dicts as the currency of FL: copying, validating, and the weighted average of FedAvg.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017), Algorithm 1: the server averages the selected clients' models

    w_{t+1} = sum_{k in S_t} (n_k / n) * w^k_{t+1},     n = sum_{k in S_t} n_k

Everything here works on state dicts, so it covers every entry of a model -- parameters and buffers,
any floating dtype, and integer buffers such as BatchNorm's ``num_batches_tracked``. A client's reply
is validated before it is averaged (:func:`validate_update`): a bad client is rejected with a message
that says what was wrong, never averaged into the global model.

Numerics, each chosen so that no accepted input can overflow or lose exactness:

* weights (sample counts) are scaled by their maximum before they are normalized, so counts up to
  ``1.8e308`` give a proper convex combination instead of ``inf / inf = NaN``;
* floating entries are combined in float64 and cast back to their own dtype (float16 and bfloat16
  included); a convex combination never exceeds the largest input, so nothing overflows;
* integer entries are averaged exactly, in rational arithmetic, and rounded half to even: any int64
  value survives (float64 has only 53 bits of mantissa);
* boolean entries take the weighted majority.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = [
    "StateDict",
    "Stateful",
    "UpdateRejected",
    "aggregate",
    "apply_delta",
    "check_weight",
    "clone_state",
    "mix_states",
    "normalized_weights",
    "state_delta",
    "validate_update",
]

StateDict = dict[str, torch.Tensor]


class UpdateRejected(ValueError):
    """A client's update failed validation; ``client`` names the client (or is None)."""

    def __init__(self, message: str, client: object = None) -> None:
        prefix = f"client {client} " if client is not None else ""
        super().__init__(prefix + message)
        self.client = client
        self.reason = message


class Stateful:
    """A server-side plug-in whose identity and state go into checkpoints (aggregators, transforms).

    :meth:`config` is its JSON identity (class and constructor arguments; part of a checkpoint's
    fingerprint); :meth:`state_dict` / :meth:`load_state_dict` carry what changes across rounds,
    as tensors and JSON values only. The defaults describe a plug-in with no state.
    """

    def config(self) -> dict[str, Any]:
        """JSON identity: the class and its constructor arguments."""
        return {"name": type(self).__name__}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but got keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached copy of a state dict (what a client sends, what the server keeps)."""
    return {k: v.detach().clone() for k, v in state.items()}


def state_delta(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> StateDict:
    """``state - reference`` for floating entries; integer and boolean entries are kept as values.

    What a client sends through the update pipeline (:mod:`labsupport.fl.transforms`): the update,
    not the weights. A counter such as ``num_batches_tracked`` has no meaningful difference.
    """
    return {k: v - reference[k] if v.is_floating_point() else v.clone() for k, v in state.items()}


def apply_delta(
    reference: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> StateDict:
    """The inverse of :func:`state_delta`: ``reference + delta`` in the reference's dtypes."""
    return {
        k: (ref + delta[k]).to(ref.dtype) if ref.is_floating_point() else delta[k].to(ref.dtype)
        for k, ref in reference.items()
    }


def check_weight(weight: object, client: object = None) -> float:
    """``weight`` as a float if it is a finite number > 0; else :class:`UpdateRejected`."""
    if not isinstance(weight, (int, float, np.integer, np.floating)) or isinstance(weight, bool):
        raise UpdateRejected(
            f"weight {weight!r} is not a number; expected the sample count", client
        )
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise UpdateRejected(f"weight {weight!r} must be a finite number > 0", client)
    return value


def validate_update(
    global_state: Mapping[str, torch.Tensor],
    update: object,
    weight: object,
    client: object = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` can be averaged into ``global_state``.

    Checks: a mapping with exactly the global model's keys; every entry a dense tensor of the same
    shape and dtype; floating entries finite; ``weight`` (the sample count) a finite number > 0.
    """
    check_weight(weight, client)
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
        if value.layout != torch.strided:
            raise UpdateRejected(
                f"{key!r} is a {value.layout} tensor; expected a dense one", client
            )
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
    # Finite floats: one check over all entries (a check per tensor cost as much as the rest of the
    # validation); the entry at fault is looked for only when it fails.
    floats = [update[k].reshape(-1) for k in global_state if update[k].is_floating_point()]
    if floats and not bool(torch.isfinite(torch.cat(floats)).all()):
        for key in global_state:
            value = update[key]
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise UpdateRejected(
                    f"{key!r} holds {bad} non-finite value(s) (NaN or inf)", client
                )


def _mix_integers(
    stacked: list[torch.Tensor], row: Sequence[Fraction], dtype: torch.dtype
) -> torch.Tensor:
    """``round(sum_j row[j] * stacked[j])`` exactly (rationals; ties to even), in ``dtype``.

    ``row`` sums to exactly 1, so the result lies between the smallest and largest input and fits
    ``dtype``; the clamp only guards a caller's row that does not.
    """
    shape = stacked[0].shape
    info = torch.iinfo(dtype)
    values = [t.reshape(-1).tolist() for t in stacked]
    out = []
    for column in zip(*values, strict=True):
        total = sum((w * v for w, v in zip(row, column, strict=True) if w), Fraction(0))
        out.append(min(max(round(total), info.min), info.max))  # round(): exact, half to even
    return torch.tensor(out, dtype=dtype).reshape(shape)


def _exact_rows(weights: torch.Tensor | Sequence[Sequence[float]]) -> list[list[Fraction]]:
    """Each row as exact fractions of its own sum (the float weights as given, then normalized)."""
    rows = weights.tolist() if isinstance(weights, torch.Tensor) else [list(r) for r in weights]
    exact = []
    for row in rows:
        fr = [Fraction(float(v)) for v in row]
        total = sum(fr, Fraction(0))
        exact.append([v / total for v in fr] if total else fr)
    return exact


def mix_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    *,
    raw_weights: Sequence[Sequence[float]] | None = None,
) -> list[StateDict]:
    """Weighted combinations of state dicts: output ``i`` is ``sum_j weights[i, j] * states[j]``.

    The one mixing rule shared by FedAvg (one row of normalized sample counts) and gossip (a mixing
    matrix, :mod:`labsupport.fl.gossip`). Rows are expected to sum to 1. Dtypes are handled as the
    module docstring says; integer entries use ``raw_weights`` (the weights before float
    normalization, e.g. the sample counts) when given, as exact fractions of each row's sum.
    """
    w = weights.to(torch.float64)
    out: list[StateDict] = [{} for _ in range(w.shape[0])]
    exact_rows = None
    for key, ref in states[0].items():
        if ref.dtype == torch.bool or not (ref.is_floating_point() or ref.is_complex()):
            if ref.dtype != torch.bool:
                if exact_rows is None:
                    exact_rows = _exact_rows(raw_weights if raw_weights is not None else w)
                parts = [s[key].detach() for s in states]
                for i, row in enumerate(exact_rows):
                    out[i][key] = _mix_integers(parts, row, ref.dtype)
                continue
            stacked = torch.stack([s[key].detach().to(torch.float64) for s in states])
            mixed = torch.tensordot(w, stacked, dims=1) >= 0.5
        else:
            stacked = torch.stack([s[key].detach().to(torch.float64) for s in states])
            mixed = torch.tensordot(w, stacked, dims=1).to(ref.dtype)
        for i in range(w.shape[0]):
            out[i][key] = mixed[i].clone() if w.shape[0] > 1 else mixed[i]
    return out


def normalized_weights(weights: Sequence[float]) -> torch.Tensor:
    """``w / sum(w)`` in float64, scaled by ``max(w)`` first so that huge finite counts cannot overflow."""
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if len(w) == 0 or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    w = w / w.max()
    return w / w.sum()


def aggregate(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted average ``sum_k w_k * state_k / sum_k w_k`` of every entry of the state dicts.

    Inputs are not validated here -- call :func:`validate_update` on each client's update first --
    except for the weights.
    """
    if len(states) == 0:
        raise ValueError("cannot aggregate an empty round: no client updates were given")
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    return mix_states(
        states, normalized_weights(weights)[None, :], raw_weights=[[float(v) for v in weights]]
    )[0]
