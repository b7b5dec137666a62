"""Shamir secret sharing: hand-worked shares, threshold behaviour, and pycryptodome as a cross-check."""

from __future__ import annotations

import itertools
import random

import pytest
from Crypto.Protocol.SecretSharing import Shamir as PyCryptoShamir

from labsupport.privacy.secagg_masking import Drbg
from labsupport.privacy.shamir import PRIME, combine, combine_bytes, split, split_bytes


def test_shares_are_the_polynomial_evaluated_at_each_point():
    coefficients = iter([5, 7])  # f(x) = 42 + 5x + 7x^2, worked by hand
    shares = split(42, [1, 2, 3], 3, lambda p: next(coefficients))
    assert shares == [42 + 5 + 7, 42 + 10 + 28, 42 + 15 + 63]
    assert combine([1, 2, 3], shares) == 42


def test_arithmetic_wraps_modulo_the_prime():
    shares = split(PRIME - 1, [1, 2], 2, lambda p: PRIME - 1)  # f(x) = -1 - x (mod p)
    assert shares == [PRIME - 2, PRIME - 3]
    assert combine([1, 2], shares) == PRIME - 1


def test_any_t_of_n_shares_reconstruct_and_t_minus_one_do_not():
    rng = random.Random(0)
    secret = rng.randrange(PRIME)
    xs = [1, 2, 3, 4, 5, 6]
    shares = split(secret, xs, 4, rng.randrange)
    for subset in itertools.combinations(range(6), 4):
        assert combine([xs[i] for i in subset], [shares[i] for i in subset]) == secret
    for subset in itertools.combinations(range(6), 3):
        assert combine([xs[i] for i in subset], [shares[i] for i in subset]) != secret


@pytest.mark.parametrize("length", [0, 1, 15, 16, 32, 33])
def test_byte_secrets_of_any_length_round_trip(length):
    drbg = Drbg(b"seed")
    secret = bytes(range(256))[:length]
    xs = [3, 9, 11, 20]
    shares = split_bytes(secret, xs, 3, drbg.randbelow)
    assert combine_bytes(xs[1:], shares[1:], length) == secret
    assert combine_bytes([xs[0], xs[3], xs[2]], [shares[0], shares[3], shares[2]], length) == secret


@pytest.mark.parametrize(("k", "n"), [(2, 3), (3, 5), (5, 9), (7, 7)])
def test_reconstructions_match_pycryptodome_on_the_same_16_byte_secret(k, n):
    rng = random.Random(k * 100 + n)
    secret = rng.randbytes(16)
    theirs = PyCryptoShamir.split(k, n, secret)
    ours = split_bytes(secret, list(range(1, n + 1)), k, rng.randrange)
    for subset in [list(range(k)), list(range(n - k, n)), sorted(rng.sample(range(n), k))]:
        from_theirs = PyCryptoShamir.combine([theirs[i] for i in subset])
        from_ours = combine_bytes([i + 1 for i in subset], [ours[i] for i in subset], 16)
        assert from_theirs == from_ours == secret
    # and with one share too few, neither library returns the secret
    short = list(range(k - 1))
    if short:
        assert PyCryptoShamir.combine([theirs[i] for i in short]) != secret
        try:
            assert combine_bytes([i + 1 for i in short], [ours[i] for i in short], 16) != secret
        except ValueError:
            pass  # the interpolated value did not even fit in 16 bytes


def test_split_refuses_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        split(1, [1, 2], 3, random.Random(0).randrange)
    with pytest.raises(ValueError, match="distinct"):
        split(1, [1, 1, 2], 2, random.Random(0).randrange)
    with pytest.raises(ValueError, match="distinct"):
        split(1, [0, 1], 2, random.Random(0).randrange)  # x = 0 would hand out the secret
    with pytest.raises(ValueError, match="secret"):
        split(PRIME, [1, 2], 2, random.Random(0).randrange)
    with pytest.raises(ValueError, match="distinct"):
        combine([1, 1], [5, 6])
