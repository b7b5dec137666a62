"""Client selection and derived seeds (labsupport.fl.selection)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labsupport.fl.selection import client_seed, num_selected, select_clients


def test_select_clients_is_seeded_sized_and_distinct():
    a = select_clients(100, 0.1, seed=1, server_round=3)
    assert a == select_clients(100, 0.1, seed=1, server_round=3)
    assert a != select_clients(100, 0.1, seed=1, server_round=4)
    assert a != select_clients(100, 0.1, seed=2, server_round=3)
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert all(0 <= c < 100 for c in a)
    assert len(select_clients(100, 0.001, min_clients=2)) == 2  # max(C*K, min)
    assert select_clients(5, 1.0) == [0, 1, 2, 3, 4]
    assert select_clients(1, 0.01) == [0]


@pytest.mark.parametrize(
    ("k", "c", "m", "expected"),
    [
        (100, 0.1, 1, 10),
        (10, 0.25, 1, 3),
        (10, 0.35, 1, 4),
        (10, 0.01, 1, 1),
        (10, 0.01, 4, 4),
        (3, 1.0, 1, 3),
        (7, 0.5, 1, 4),
    ],
)
def test_num_selected_is_c_times_k_rounded_half_up_at_least_min(k, c, m, expected):
    assert num_selected(k, c, m) == expected
    assert expected == min(k, max(math.floor(c * k + 0.5), m))


def test_every_client_is_selected_about_equally_often():
    counts = np.zeros(20)
    rounds = 2000
    for r in range(1, rounds + 1):
        counts[select_clients(20, 0.25, seed=0, server_round=r)] += 1
    # each round picks 5 of 20: a client's count is Binomial(2000, 1/4), sd about 19.4
    assert np.abs(counts - rounds / 4).max() < 6 * math.sqrt(rounds * 0.25 * 0.75)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 0.5), {}, "num_clients"),
        ((10, 0.0), {}, "fraction"),
        ((10, 1.5), {}, "fraction"),
        ((10, float("nan")), {}, "fraction"),
        ((10, 0.5), {"min_clients": 0}, "min_clients"),
        ((10, 0.5), {"min_clients": 11}, "min_clients"),
    ],
)
def test_select_clients_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_clients(*args, **kwargs)


def test_client_seed_depends_on_every_part():
    seeds = {client_seed(s, r, c) for s in (0, 1) for r in (1, 2) for c in (0, 1)}
    assert len(seeds) == 8 and client_seed(0, 1, 0) == client_seed(0, 1, 0)
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    # the order of the parts matters: (round 1, client 2) is not (round 2, client 1)
    assert client_seed(0, 1, 2) != client_seed(0, 2, 1)
