"""Client selectors: power-of-choice by hand, and the naive "most diverse" rule starving clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl.client_selection import (
    bind,
    global_losses,
    label_entropy,
    most_diverse,
    participation_counts,
    power_of_choice,
    uniform,
)
from labsupport.fl.clients import DataClient
from labsupport.fl.selection import select_clients


def test_uniform_is_the_servers_rule():
    assert uniform(20, 0.25, seed=3, server_round=4) == select_clients(
        20, 0.25, seed=3, server_round=4
    )


def test_power_of_choice_picks_the_highest_losses_among_its_candidates():
    losses = list(np.random.default_rng(0).uniform(size=30))
    asked = []

    def ask(candidates):
        asked.append(list(candidates))
        return [losses[i] for i in candidates]

    got = power_of_choice(30, 0.1, losses=ask, d=9, seed=1, server_round=2)
    cand = asked[0]
    assert len(cand) == 9 and len(set(cand)) == 9
    want = sorted(sorted(cand, key=lambda i: -losses[i])[:3])
    assert got == want
    assert power_of_choice(30, 0.1, losses=losses, d=9, seed=1, server_round=2) == got


def test_power_of_choice_with_all_candidates_is_the_global_top_m():
    losses = [0.1, 5.0, 0.3, 4.0, 4.0, 0.2]
    assert power_of_choice(6, 0.5, losses=losses, d=6) == [1, 3, 4]


def test_power_of_choice_candidates_follow_the_data_sizes():
    sizes = [1.0] * 9 + [1e6]
    hits = sum(
        9 in power_of_choice(10, 0.1, losses=[0.0] * 10, sizes=sizes, d=2, server_round=r)
        for r in range(50)
    )
    # client 9 is a candidate every round (p ~ 1); with equal losses ties go to the lower id
    cands_with_9 = [
        power_of_choice(10, 0.2, losses=[0.0] * 9 + [1.0], sizes=sizes, d=2, server_round=r)
        for r in range(20)
    ]
    assert all(9 in c for c in cands_with_9)
    assert hits == 0


def test_power_of_choice_refuses_bad_input():
    with pytest.raises(ValueError, match="d"):
        power_of_choice(10, 0.5, losses=[0.0] * 10, d=2)
    with pytest.raises(ValueError, match="losses"):
        power_of_choice(10, 0.2, losses=[0.0] * 9)
    with pytest.raises(ValueError, match="finite"):
        power_of_choice(4, 0.5, losses=[float("nan")] * 4, d=4)
    with pytest.raises(ValueError, match="sizes"):
        power_of_choice(4, 0.5, losses=[0.0] * 4, sizes=[1, 1, 0, 1])


def test_label_entropy_equals_a_hand_computation():
    counts = np.array([[5, 5, 0], [10, 0, 0], [1, 1, 2]])
    want = [np.log(2), 0.0, -(0.25 * np.log(0.25) * 2 + 0.5 * np.log(0.5))]
    np.testing.assert_allclose(label_entropy(counts), want)


def test_most_diverse_starves_the_other_clients():
    counts = np.random.default_rng(0).integers(0, 50, size=(20, 10))
    pick = bind(most_diverse, label_counts=counts)
    rounds = [pick(20, 0.2, seed=0, server_round=r) for r in range(1, 31)]
    hist = participation_counts(rounds, 20)
    assert (hist == 30).sum() == 4 and (hist == 0).sum() == 16
    fair = participation_counts([uniform(20, 0.2, server_round=r) for r in range(1, 31)], 20)
    assert (fair == 0).sum() < 3
    with pytest.raises(ValueError):
        participation_counts([[20]], 20)


def test_global_losses_equal_cross_entropy_per_client():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    clients = [DataClient(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    got = global_losses(model, clients, [0, 2])
    with torch.no_grad():
        want = [
            float(nn.functional.cross_entropy(model(clients[i].x), clients[i].y)) for i in (0, 2)
        ]
    assert got == pytest.approx(want)
