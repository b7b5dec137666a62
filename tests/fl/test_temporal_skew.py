"""Temporal skew: a client's data follows its schedule of phases as the rounds go by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.fl.clients import RoundContext, TrainConfig
from labsupport.temporal_skew import TemporalClient, drifting_clients, drifting_partition, phase_of


def test_phase_of_rounds():
    assert [phase_of(r, 3, 2) for r in (1, 3, 4, 6, 7, 100)] == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        phase_of(0, 3, 2)


def test_drifting_partition_uses_every_sample_once_per_phase_and_changes_the_mixture():
    y = np.repeat(np.arange(5), 40)
    phases = drifting_partition(y, 4, 3, alpha=0.3, seed=1, min_partition_size=1)
    for parts in phases:
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    hist = [np.bincount(y[phases[p][0]], minlength=5) for p in range(3)]
    assert not np.array_equal(hist[0], hist[1])


def test_temporal_client_trains_on_the_data_of_the_current_phase():
    x = torch.randn(30, 4)
    y = torch.arange(30) % 3
    schedule = [np.arange(0, 10), np.arange(10, 25)]
    client = TemporalClient(x, y, schedule, rounds_per_phase=2)
    model = torch.nn.Linear(4, 3)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(batch_size=5)
    assert client.fit(model, glob, RoundContext(2, 0, 0), cfg).num_samples == 10
    assert client.fit(model, glob, RoundContext(3, 0, 0), cfg).num_samples == 15
    assert torch.equal(client.data_at(9).x, x[10:25])
    with pytest.raises(ValueError):
        TemporalClient(x, y, [np.arange(0)])
    assert len(drifting_clients(x, y, 2, 2, 1, alpha=1.0)) == 2
