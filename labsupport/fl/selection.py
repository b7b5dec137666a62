"""Client selection and the seeds derived from it (McMahan et al. 2017, Algorithm 1, line "S_t").

Each round the server picks ``m = max(C * K, 1)`` of the ``K`` clients uniformly without replacement
(:func:`select_clients`). Every source of randomness of a round is *derived* from ``(seed, round,
client)`` rather than drawn from a running generator (:func:`client_seed`): any round can be replayed
on its own, which makes checkpoint/resume exact and lets Flower's clients reproduce our simulator's
batches (chapter 01). Chapter 03 adds selection rules that look at the clients (power-of-choice).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["client_seed", "num_selected", "select_clients"]


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """The seed of client ``client_id``'s randomness (batch order, noise) in ``server_round``."""
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
