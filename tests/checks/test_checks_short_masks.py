"""The chapter 02 short exercise: pairwise masks. The check passes the solution and the other sign
convention, and names each plausible mistake; its reference agrees with Python integers."""

from __future__ import annotations

import numpy as np
import pytest

from labsupport.checks import CheckFailed, check_pairwise_masks
from labsupport.checks.short import _reference_masked
from labsupport.privacy.secagg_masking import prg


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("short")


def test_solution_passes_the_masks_check(sol, capsys):
    check_pairwise_masks(sol["masked_input"], seed=0)
    check_pairwise_masks(sol["masked_input"], seed=1)
    assert capsys.readouterr().out.count("passed") == 2


def _keep(bits):
    return np.uint64((1 << bits) - 1)


def _masked(x, me, seeds, bits, *, rule):
    y = x.copy()
    for peer, seed in seeds.items():
        m = prg(seed, len(x), bits)
        y = y + m if rule(me, peer) else y - m
    return y & _keep(bits)


def larger_index_adds(x, me, seeds, bits):
    return _masked(x, me, seeds, bits, rule=lambda me, peer: me > peer)


def everyone_adds(x, me, seeds, bits):
    return _masked(x, me, seeds, bits, rule=lambda me, peer: True)


def no_modulo(x, me, seeds, bits):
    y = x.copy()
    for peer, seed in seeds.items():
        m = prg(seed, len(x), bits)
        y = y + m if me < peer else y - m
    return y


def in_floats(x, me, seeds, bits):
    y = x.astype(np.float64)
    for peer, seed in seeds.items():
        m = prg(seed, len(x), bits).astype(np.float64)
        y = y + m if me < peer else y - m
    return np.mod(y, 2.0**bits)


def only_upper_peers(x, me, seeds, bits):
    y = x.copy()
    for peer, seed in seeds.items():
        if me < peer:
            y = y + prg(seed, len(x), bits)
    return y & _keep(bits)


def test_the_other_sign_convention_is_accepted():
    check_pairwise_masks(larger_index_adds, seed=2)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (everyone_adds, "both clients of a pair added"),
        (no_modulo, "reduce modulo"),
        (in_floats, "keep uint64"),
        (only_upper_peers, "equals its input"),  # the last client has no peer above it
        (lambda x, me, seeds, bits: x.copy(), "equals its input"),
    ],
)
def test_masks_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_pairwise_masks(wrong, seed=3)


@pytest.mark.parametrize("bits", [20, 64])
def test_reference_masking_matches_python_integers(bits):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**20, 16).astype(np.uint64)
    seeds = {0: bytes(range(32)), 3: bytes(range(1, 33)), 5: bytes(32)}
    me = 2
    want = [int(v) for v in x]
    for peer, seed in seeds.items():
        m = [int(v) for v in prg(seed, 16, bits)]
        sign = 1 if me < peer else -1
        want = [(a + sign * b) % 2**bits for a, b in zip(want, m, strict=True)]
    got = _reference_masked(x, me, seeds, bits)
    assert [int(v) for v in got] == want
