"""Any labsupport :class:`~labsupport.fl.aggregators.Aggregator` as a Flower 1.42 strategy.

The course writes every aggregation rule once, as an ``Aggregator`` over state dicts
(``aggregate(global_state, replies) -> new global state``): FedAvg's sample-weighted mean
(McMahan et al. 2017, Algorithm 1, :class:`~labsupport.fl.aggregators.WeightedMean`) and chapter 03's
robust rules (coordinate-wise median, trimmed mean, Krum -- :mod:`labsupport.fl.robust`).
:class:`AggregatorStrategy` runs such an object inside Flower's Message API (it subclasses
``flwr.serverapp.strategy.FedAvg``, so sampling, evaluation and ``strategy.start`` are Flower's):

* ``configure_train`` keeps the round's global model (the ``ArrayRecord`` Flower is about to send) as
  a state dict, and adds ``aggregator.instructions(round, global_state)`` to the message: scalar
  values (int, float, str, bool, bytes, lists of them) go into the train ``ConfigRecord`` under their
  own names; tensors, and mappings of names to tensors (a control variate), go into an
  ``ArrayRecord`` under :data:`INSTRUCTIONS_KEY` (``"name"`` or ``"name/entry"``), which a ClientApp
  reads back with :func:`decode_instructions`. An instruction whose name is already a config key is
  refused (it would silently change the run's configuration).
* ``aggregate_train`` turns each reply's ``ArrayRecord`` into a state dict with the global model's
  keys and dtypes (floating entries are cast to the global dtype; integer and bool entries must match),
  its ``num-examples`` into ``num_samples``, validates it with
  :func:`labsupport.fl.state.validate_update` (a reply with NaN, a wrong shape or key, or a
  non-positive count is *rejected and recorded*, not averaged -- Flower's own FedAvg would fail the
  whole round on one inconsistent reply), calls ``aggregator.aggregate(global_state, replies)``, and
  keeps the result as the new global state. The client of a reply is its ``partition-id`` if it
  reports one (a ``ConfigRecord`` named ``"client"`` in the reply, as ``flower_app`` does), else the
  SuperNode's id. A round in which no reply is accepted raises: a run whose clients all fail must not
  look complete.

:func:`make_aggregator` resolves the app's ``aggregator`` run-config knob (``"weighted-mean"``,
``"median"``, ``"trimmed-mean:0.1"``, ``"krum:1"``) through a small registry, so chapter 03's
aggregators are written once, in :mod:`labsupport.fl.robust`, and used by both the in-process server
and the Flower app. Chapter 01 uses the bridge for FedAvg (``flower_app``'s ServerApp), chapter 03 for
its robust rules on Flower.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from labsupport.fl.aggregators import Aggregator, WeightedMean
from labsupport.fl.clients import FitReply
from labsupport.fl.state import StateDict, UpdateRejected, clone_state, validate_update

__all__ = [
    "AGGREGATORS",
    "CLIENT_KEY",
    "INSTRUCTIONS_KEY",
    "AggregatorStrategy",
    "RoundOutcome",
    "decode_instructions",
    "encode_instructions",
    "make_aggregator",
    "parse_aggregator",
    "register_aggregator",
]

logger = logging.getLogger("labsupport.flower")

#: Key of the ``ArrayRecord`` holding tensor instructions in a train message.
INSTRUCTIONS_KEY = "instructions"
#: Key of the ``ConfigRecord`` in which a ClientApp may report who it is (``partition-id``).
CLIENT_KEY = "client"

_SCALARS = (int, float, str, bytes, bool)


# ------------------------------------------------------------------------------ instructions


def _is_config_value(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list) and value:
        kinds = {type(v) for v in value}
        return len(kinds) == 1 and kinds.pop() in _SCALARS
    return False


def encode_instructions(
    instructions: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split an aggregator's instructions into ConfigRecord values and ArrayRecord tensors.

    Scalars and non-empty lists of one scalar type stay as they are; a tensor ``t`` under ``name``
    becomes ``{"name": t}``; a mapping of tensors ``{k: t}`` becomes ``{"name/k": t}``. Anything
    else (``None``, a dict of scalars, an object) raises ``TypeError`` naming the instruction.
    """
    if not isinstance(instructions, Mapping):
        raise TypeError(
            f"instructions must be a mapping of names to values, got {type(instructions).__name__}"
        )
    config: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in instructions.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"instruction name {name!r} must be a non-empty string without '/'")
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu()
        elif (
            isinstance(value, Mapping)
            and value
            and all(isinstance(v, torch.Tensor) for v in value.values())
        ):
            for key, tensor in value.items():
                tensors[f"{name}/{key}"] = tensor.detach().cpu()
        elif _is_config_value(value):
            config[name] = value
        else:
            raise TypeError(
                f"instruction {name!r} is a {type(value).__name__}; a Flower message can carry "
                "int, float, str, bytes, bool, a non-empty list of one of them, a tensor, or a "
                "mapping of names to tensors"
            )
    return config, tensors


def decode_instructions(content: RecordDict, key: str = INSTRUCTIONS_KEY) -> dict[str, Any]:
    """The tensor instructions of a train message (client side): ``{name: tensor}`` and
    ``{name: {entry: tensor}}`` as :func:`encode_instructions` wrote them; ``{}`` if there are none.

    Scalar instructions are plain entries of the message's ``ConfigRecord``.
    """
    if key not in content.array_records:
        return {}
    out: dict[str, Any] = {}
    for full, tensor in content.array_records[key].to_torch_state_dict().items():
        name, _, entry = full.partition("/")
        if entry:
            out.setdefault(name, {})[entry] = tensor
        else:
            out[name] = tensor
    return out


# ------------------------------------------------------------------------------ the strategy


@dataclass
class RoundOutcome:
    """What happened to the train replies of one round."""

    clients: list[int] = field(default_factory=list)  # accepted, in reply order
    node_ids: list[int] = field(default_factory=list)  # their SuperNode ids
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why it was not averaged
    errors: list[str] = field(default_factory=list)  # error replies (a ClientApp that raised)


class AggregatorStrategy(FedAvg):
    """Flower's FedAvg with its aggregation replaced by a labsupport ``Aggregator``.

    ``aggregator`` decides the new global model; ``global_state`` is the model of the first round
    (needed only when ``aggregate_train`` is called without ``configure_train``, as in a test --
    ``strategy.start`` passes it through ``configure_train``). The other arguments are FedAvg's.
    ``rounds[r]`` holds each round's :class:`RoundOutcome`; ``global_state`` the current model.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        global_state: Mapping[str, torch.Tensor] | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"aggregator must be a labsupport.fl.aggregators.Aggregator, got "
                f"{type(aggregator).__name__}"
            )
        super().__init__(**fedavg_kwargs)
        self.aggregator = aggregator
        self.global_state: StateDict | None = (
            clone_state(global_state) if global_state is not None else None
        )
        self.rounds: dict[int, RoundOutcome] = {}

    def summary(self) -> None:
        super().summary()
        logger.info("aggregator: %r", self.aggregator)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep ``arrays`` as the round's global state and add the aggregator's instructions."""
        self.global_state = clone_state(arrays.to_torch_state_dict())
        scalars, tensors = encode_instructions(
            self.aggregator.instructions(server_round, clone_state(self.global_state))
        )
        clash = sorted(set(scalars) & (set(config) | {"server-round"}))
        if clash:
            raise ValueError(
                f"instruction(s) {clash} of {self.aggregator!r} have the names of run config "
                "entries; rename them"
            )
        config = ConfigRecord({**config, **scalars}) if scalars else config
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if tensors:
            record = ArrayRecord(tensors)
            for message in messages:  # FedAvg gives every message the same RecordDict
                message.content[INSTRUCTIONS_KEY] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate the accepted ones with the aggregator, keep the result."""
        if self.global_state is None:
            raise RuntimeError(
                "aggregate_train needs the round's global model: pass global_state= to "
                "AggregatorStrategy, or let configure_train (strategy.start) set it"
            )
        valid, failed = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        outcome = RoundOutcome(errors=[m.error.reason for m in failed])
        self.rounds[server_round] = outcome
        accepted: list[FitReply] = []
        for message in valid:
            node = int(message.metadata.src_node_id)
            client = _reported_client(message.content, node)
            try:
                reply = self._to_fit_reply(message.content, client)
                validate_update(self.global_state, reply.state, reply.num_samples, client=client)
            except (UpdateRejected, ValueError, TypeError, KeyError) as exc:
                reason = exc.reason if isinstance(exc, UpdateRejected) else str(exc)
                outcome.rejected[client] = reason
                logger.warning("round %d: rejected client %d: %s", server_round, client, reason)
                continue
            accepted.append(reply)
            outcome.clients.append(client)
            outcome.node_ids.append(node)
        if not accepted:
            raise RuntimeError(
                f"round {server_round}: none of the {len(valid) + len(failed)} sampled clients "
                f"trained; errors: {outcome.errors[:3]}; rejected: {dict(list(outcome.rejected.items())[:3])}"
            )
        new_state = self.aggregator.aggregate(clone_state(self.global_state), accepted)
        try:
            validate_update(self.global_state, new_state, 1.0)
        except UpdateRejected as exc:
            raise RuntimeError(
                f"{self.aggregator!r} returned a state that does not fit the model: {exc.reason}"
            ) from None
        self.global_state = clone_state(new_state)
        return ArrayRecord(clone_state(new_state)), MetricRecord(_mean_metrics(accepted))

    def _to_fit_reply(self, content: RecordDict, client: int) -> FitReply:
        """A reply's content as a FitReply with the global model's keys and dtypes."""
        assert self.global_state is not None
        if self.arrayrecord_key in content.array_records:
            record = content.array_records[self.arrayrecord_key]
        elif len(content.array_records) == 1:
            record = next(iter(content.array_records.values()))
        else:
            raise ValueError(
                f"reply holds ArrayRecords {sorted(content.array_records)}; expected one "
                f"named {self.arrayrecord_key!r}"
            )
        if len(content.metric_records) != 1:
            raise ValueError(
                f"reply holds {len(content.metric_records)} MetricRecords; expected exactly one"
            )
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise ValueError(f"reply's MetricRecord has no {self.weighted_by_key!r}")
        num_samples = metrics[self.weighted_by_key]
        if isinstance(num_samples, list) or isinstance(num_samples, bool):
            raise TypeError(
                f"{self.weighted_by_key!r} must be a single number, got {num_samples!r}"
            )
        received = record.to_torch_state_dict()
        state: StateDict = {}
        for key, ref in self.global_state.items():
            if key not in received:
                continue  # validate_update names the missing keys
            value = received[key]
            if value.dtype != ref.dtype and value.is_floating_point() and ref.is_floating_point():
                value = value.to(ref.dtype)
            state[key] = value
        state.update({k: v for k, v in received.items() if k not in self.global_state})
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if k != self.weighted_by_key and isinstance(v, int | float) and not isinstance(v, bool)
        }
        return FitReply(state, float(num_samples), numbers, client)


def _reported_client(content: RecordDict, node_id: int) -> int:
    """The reply's ``partition-id`` (a ConfigRecord named ``"client"``) or else its node id."""
    record = content.config_records.get(CLIENT_KEY)
    if record is not None and isinstance(record.get("partition-id"), int):
        return int(record["partition-id"])
    return node_id


def _mean_metrics(replies: list[FitReply]) -> dict[str, float]:
    """Sample-weighted mean of each metric that every accepted reply reports (finite values)."""
    if not replies:
        return {}
    common = set(replies[0].metrics).intersection(*(r.metrics for r in replies[1:]))
    total = sum(r.num_samples for r in replies)
    out = {}
    for key in sorted(common):
        value = sum(r.num_samples * r.metrics[key] for r in replies) / total
        if math.isfinite(value):
            out[key] = value
    return out


# ------------------------------------------------------------------------------ the registry


def _from_module(module: str, name: str) -> Callable[..., Aggregator]:
    """A factory that imports ``module.name`` when first called (chapter 03's module may be absent)."""

    def factory(*args: float) -> Aggregator:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"aggregator {module}.{name} is not available: {exc}") from exc
        return cls(*args)

    factory.__qualname__ = f"{module}.{name}"
    return factory


#: Aggregator names for the ``aggregator`` run-config knob -> factory taking the ``:args``.
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "weighted-mean": WeightedMean,
    "median": _from_module("labsupport.fl.robust", "Median"),
    "trimmed-mean": _from_module("labsupport.fl.robust", "TrimmedMean"),
    "krum": _from_module("labsupport.fl.robust", "Krum"),
    "multi-krum": _from_module("labsupport.fl.robust", "MultiKrum"),
    "geometric-median": _from_module("labsupport.fl.robust", "GeometricMedian"),
    "centered-clipping": _from_module("labsupport.fl.robust", "CenteredClipping"),
    "norm-bounding": _from_module("labsupport.fl.robust", "NormBounding"),
}


def register_aggregator(name: str, factory: Callable[..., Aggregator]) -> None:
    """Make ``name`` (lowercase, ``-`` between words) usable as the ``aggregator`` knob."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or ":" in name:
        raise ValueError(f"aggregator name {name!r} must be lowercase, non-empty and without ':'")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    AGGREGATORS[name] = factory


def parse_aggregator(spec: str) -> tuple[str, tuple[int | float, ...]]:
    """``"trimmed-mean:0.1"`` -> ``("trimmed-mean", (0.1,))``; ``"krum:1"`` -> ``("krum", (1,))``.

    Arguments are comma-separated numbers (ints stay ints). Unknown names raise ``ValueError``
    listing the known ones; nothing is imported or constructed.
    """
    if not isinstance(spec, str):
        raise TypeError(f"aggregator must be a string like 'median', got {type(spec).__name__}")
    name, sep, rest = spec.strip().partition(":")
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}")
    args: list[int | float] = []
    for text in filter(None, (t.strip() for t in rest.split(","))) if rest else ():
        try:
            args.append(int(text))
        except ValueError:
            try:
                args.append(float(text))
            except ValueError:
                raise ValueError(
                    f"aggregator {spec!r}: argument {text!r} is not a number"
                ) from None
    if sep and not args:
        raise ValueError(f"aggregator {spec!r} has an empty argument list after ':'")
    return name, tuple(args)


def make_aggregator(spec: str | Aggregator) -> Aggregator:
    """The :class:`Aggregator` named by ``spec`` (or ``spec`` itself if it is one).

    ``"weighted-mean"`` is FedAvg; ``"median"``, ``"trimmed-mean:BETA"``, ``"krum:F"``,
    ``"multi-krum:F,M"``, ``"geometric-median"`` come from :mod:`labsupport.fl.robust`; the
    arguments are those of the class's constructor.
    """
    if isinstance(spec, Aggregator):
        return spec
    name, args = parse_aggregator(spec)
    try:
        aggregator = AGGREGATORS[name](*args)
    except TypeError as exc:
        raise ValueError(f"aggregator {spec!r}: {exc}") from exc
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator {spec!r} built a {type(aggregator).__name__}, not an Aggregator"
        )
    return aggregator
