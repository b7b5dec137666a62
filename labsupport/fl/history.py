"""One record of a federated run, whatever ran it: the FedAvg server, gossip, or Flower.

Every run in the course -- :class:`~labsupport.fl.server.FedAvgSimulation`,
:class:`~labsupport.fl.gossip.GossipSimulation`, and Flower's apps (:meth:`History.from_flower`) --
appends one :class:`RoundRecord` per round to a :class:`History`, so one plotting function
(:mod:`labsupport.plotting`) draws any of them. Chapter-specific figures go into ``extra`` (ε spent
and its accountant, clients masked or dropped, gossip's consensus distance, per-client metrics): a
mapping of names to JSON values, saved with checkpoints as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["History", "RoundRecord"]


@dataclass
class RoundRecord:
    """What happened in one round. ``accuracy``/``loss`` are None in rounds without evaluation."""

    round: int
    clients: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float | None = None  # sample-weighted mean of the accepted clients' training losses
    accuracy: float | None = None
    loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class History:
    """Per-round records of a run, with the usual questions about them."""

    rounds: list[RoundRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rounds)

    def append(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def column(self, name: str) -> list:
        """A field of every round, or an ``extra`` entry (None where a round lacks it)."""
        if name in RoundRecord.__dataclass_fields__:
            return [getattr(r, name) for r in self.rounds]
        return [r.extra.get(name) for r in self.rounds]

    def evaluated(self, name: str = "accuracy") -> tuple[list[int], list[float]]:
        """Rounds where ``name`` (a field or an ``extra`` entry) was measured, and its values."""
        pairs = [
            (r.round, v)
            for r, v in zip(self.rounds, self.column(name), strict=True)
            if v is not None
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def rounds_to(self, accuracy: float) -> int | None:
        """The first evaluated round whose accuracy reached ``accuracy`` (None if never)."""
        for r in self.rounds:
            if r.accuracy is not None and r.accuracy >= accuracy:
                return r.round
        return None

    def cumulative(self, name: str) -> list:
        """Running total of a per-round column, e.g. ``cumulative("bytes_up")``."""
        total, out = 0, []
        for value in self.column(name):
            total += value or 0
            out.append(total)
        return out

    @property
    def final_accuracy(self) -> float | None:
        _, acc = self.evaluated()
        return acc[-1] if acc else None

    def to_dicts(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.rounds]

    @classmethod
    def from_dicts(cls, rows: Sequence[Mapping]) -> History:
        """Rebuild from :meth:`to_dicts` (or JSON of it); unknown keys are refused."""
        known = set(RoundRecord.__dataclass_fields__)
        records = []
        for i, row in enumerate(rows):
            unknown = set(row) - known
            if unknown:
                raise ValueError(f"history row {i} has unknown fields {sorted(unknown)}")
            fields = dict(row)
            fields["rejected"] = {int(k): str(v) for k, v in fields.get("rejected", {}).items()}
            fields["clients"] = [int(c) for c in fields.get("clients", [])]
            records.append(RoundRecord(**fields))
        return cls(records)

    @classmethod
    def from_flower(cls, rows: Sequence[Mapping[str, Any]]) -> History:
        """A Flower app's per-round history (``flower_app``'s results JSON) in this shape.

        Each row has ``round`` and any of ``accuracy``, ``loss``, ``train_loss``, ``clients``,
        ``errors``, ``seconds``; everything else goes to ``extra``. Round 0 (Flower's evaluation
        of the initial model) is dropped; NaN becomes None.
        """
        known = {"round", "accuracy", "loss", "train_loss", "clients", "errors", "seconds"}

        def num(v: Any) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

        records = []
        for row in rows:
            if int(row["round"]) < 1:
                continue
            clients = row.get("clients", [])
            errors = row.get("errors", [])
            records.append(
                RoundRecord(
                    round=int(row["round"]),
                    clients=[int(c) for c in clients] if isinstance(clients, list) else [],
                    rejected={i: str(e) for i, e in enumerate(errors)},
                    train_loss=num(row.get("train_loss")),
                    accuracy=num(row.get("accuracy")),
                    loss=num(row.get("loss")),
                    seconds=float(row.get("seconds") or 0.0),
                    extra={k: v for k, v in row.items() if k not in known},
                )
            )
        return cls(records)
