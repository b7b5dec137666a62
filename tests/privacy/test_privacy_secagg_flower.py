"""Flower 1.42's SecAgg+ (legacy API) on chapter 01's task agrees with plain FedAvg (slow: Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from labsupport.fl.clients import TrainConfig
from labsupport.fl.state import aggregate


@pytest.mark.slow
def test_flower_secaggplus_aggregate_matches_plain_fedavg():
    pytest.importorskip("flwr")
    from labsupport.privacy.secagg_flower import local_states, run_flower_secaggplus

    run = run_flower_secaggplus(
        num_clients=4, num_rounds=1, num_shares=3, reconstruction_threshold=2
    )
    states = local_states(
        run["initial_state"], 4, 1, TrainConfig(local_epochs=1, batch_size=10, lr=0.05)
    )
    expected = aggregate([s for s, _ in states], [n for _, n in states])
    moved = max(float((expected[k] - run["initial_state"][k]).abs().max()) for k in expected)
    for key, value in expected.items():
        err = float((run["state_dict"][key] - value).abs().max())
        assert err < 1e-3, (key, err)  # Flower quantizes weights in [-8, 8] to 2^22 levels
    assert moved > 1e-2  # the round did train: the check is not comparing two copies of the init


def test_flowers_mask_generator_is_a_32_bit_seeded_mersenne_twister():
    pytest.importorskip("flwr")
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a = pseudo_rand_gen(b"\x01\x00\x00\x00" + bytes(28), 4, [(100_000,)])[0]
    b = pseudo_rand_gen(bytes(28) + b"\x01\x00\x00\x00", 4, [(100_000,)])[0]
    assert np.array_equal(a, b)  # two different 32-byte secrets, the same mask (XOR-folded seed)
    assert a.max() == 2  # randint(0, R - 1) never draws R - 1: the mask is not uniform mod R
