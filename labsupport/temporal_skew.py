"""Temporal skew: clients whose data distribution drifts across rounds.

Label, feature and quantity skew (:mod:`labsupport.partitions`) are fixed in time. Real clients drift:
a phone's photos change with the seasons, a sensor ages. Here each client's local data is a *schedule*
of index sets over rounds -- :func:`drifting_partition` draws a fresh Dirichlet label-skew partition
of the same training set for each phase, so at every phase boundary every client's label mixture
changes (while each phase still uses every sample once) -- and :class:`TemporalClient` trains in round
``ctx.server_round`` on the data of the current phase. The concept of drift across rounds follows the
"time-evolving heterogeneity" of Zhu et al., "Federated learning on non-IID data: a survey"
(Neurocomputing 2021, Section 2) and Kairouz et al., "Advances and open problems in federated
learning" (2021, Section 3.1). Chapter 03 measures FedAvg under it (benchmark ``noniid_sweep``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from labsupport.fl.clients import DataClient, FitReply, RoundContext, TrainConfig
from labsupport.fl.state import StateDict

try:  # the partitions moved from labsupport.noniid to labsupport.partitions
    from labsupport.partitions import dirichlet
except ImportError:  # pragma: no cover
    from labsupport.noniid import dirichlet

__all__ = ["TemporalClient", "drifting_clients", "drifting_partition", "phase_of"]


def phase_of(server_round: int, rounds_per_phase: int, num_phases: int) -> int:
    """Phase of a round: ``min((round - 1) // rounds_per_phase, num_phases - 1)`` (rounds from 1)."""
    if server_round < 1 or rounds_per_phase < 1 or num_phases < 1:
        raise ValueError(
            f"need server_round >= 1, rounds_per_phase >= 1, num_phases >= 1; got "
            f"{server_round}, {rounds_per_phase}, {num_phases}"
        )
    return min((server_round - 1) // rounds_per_phase, num_phases - 1)


def drifting_partition(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    num_phases: int,
    *,
    alpha: float = 0.3,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[list[np.ndarray]]:
    """``phases[p][k]``: client ``k``'s indices in phase ``p`` (an independent Dirichlet draw per phase)."""
    if num_phases < 1:
        raise ValueError(f"num_phases must be >= 1, got {num_phases}")
    return [
        dirichlet(
            labels,
            num_clients,
            alpha=alpha,
            seed=seed + 1000 * p,
            min_partition_size=min_partition_size,
        )
        for p in range(num_phases)
    ]


@dataclass
class TemporalClient:
    """A client whose local data in round ``r`` is ``schedule[phase_of(r)]`` of the shared pool."""

    x: torch.Tensor
    y: torch.Tensor
    schedule: Sequence[np.ndarray]
    rounds_per_phase: int = 5

    def __post_init__(self) -> None:
        if not self.schedule or any(len(idx) == 0 for idx in self.schedule):
            raise ValueError("every phase of a temporal client needs at least one sample")
        self._clients = [
            DataClient(self.x[torch.as_tensor(idx)], self.y[torch.as_tensor(idx)])
            for idx in self.schedule
        ]

    @property
    def num_samples(self) -> int:
        """The size of the first phase (each reply reports the size of its own phase)."""
        return self._clients[0].num_samples

    def data_at(self, server_round: int) -> DataClient:
        return self._clients[phase_of(server_round, self.rounds_per_phase, len(self._clients))]

    def fit(
        self, model: nn.Module, global_state: StateDict, ctx: RoundContext, config: TrainConfig
    ) -> FitReply:
        return self.data_at(ctx.server_round).fit(model, global_state, ctx, config)


def drifting_clients(
    x: torch.Tensor,
    y: torch.Tensor,
    num_clients: int,
    num_phases: int,
    rounds_per_phase: int,
    *,
    alpha: float = 0.3,
    seed: int = 0,
) -> list[TemporalClient]:
    """``num_clients`` :class:`TemporalClient` objects over ``(x, y)``, drifting every ``rounds_per_phase``."""
    phases = drifting_partition(y, num_clients, num_phases, alpha=alpha, seed=seed)
    return [
        TemporalClient(x, y, [phases[p][k] for p in range(num_phases)], rounds_per_phase)
        for k in range(num_clients)
    ]
