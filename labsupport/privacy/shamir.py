"""Shamir's t-out-of-n secret sharing over the prime field GF(2^127 - 1).

Shamir, "How to Share a Secret" (CACM 1979): the dealer picks a random polynomial
``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` over GF(p) and gives party ``i`` the share ``(i, f(i))``;
any ``t`` shares determine ``f`` and so ``s = f(0)`` by Lagrange interpolation,

    s = sum_j y_j * prod_{m != j} x_m / (x_m - x_j)     (mod p),

while ``t - 1`` shares reveal nothing about ``s``. Secure aggregation (Bonawitz et al. 2017, round
ShareKeys) shares each client's pairwise-mask private key and self-mask seed this way, so the
server can rebuild what it needs when clients drop out (:mod:`labsupport.privacy.secagg`).

``p = 2^127 - 1`` is a Mersenne prime, so Python's integers do the field arithmetic directly. A
32-byte secret does not fit in one field element; :func:`split_bytes` cuts a byte string into
15-byte chunks (< 2^120 < p) and shares every chunk with its own polynomial at the same ``x``.
Chapter 02 cross-checks this against pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["CHUNK_BYTES", "PRIME", "combine", "combine_bytes", "split", "split_bytes"]

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15  # a 120-bit chunk is always < PRIME

RandBelow = Callable[
    [int], int
]  # randbelow(p) -> uniform int in [0, p): secrets.randbelow or a DRBG


def split(secret: int, xs: Sequence[int], threshold: int, randbelow: RandBelow) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of a random degree-(t-1) polynomial with ``f(0) = secret``."""
    if not 0 <= secret < PRIME:
        raise ValueError(f"secret must be in [0, 2^127 - 1), got {secret}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold must be in [1, {len(xs)}] (the number of shares), got {threshold}"
        )
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"share points must be distinct and in [1, p), got {list(xs)}")
    coefficients = [secret] + [randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for a in reversed(coefficients):  # Horner
            y = (y * x + a) % PRIME
        shares.append(y)
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """The coefficients ``l_j = prod_{m != j} x_m / (x_m - x_j) mod p`` with ``f(0) = sum_j l_j f(x_j)``."""
    if len(set(xs)) != len(xs):
        raise ValueError(f"share points must be distinct, got {list(xs)}")
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def combine(xs: Sequence[int], ys: Sequence[int]) -> int:
    """``f(0)`` from the shares ``(xs[j], ys[j])``: the secret, if at least ``t`` shares are given."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need as many share values as points (>= 1), got {len(xs)} and {len(ys)}")
    return sum(c * y for c, y in zip(lagrange_at_zero(xs), ys, strict=True)) % PRIME


def split_bytes(
    secret: bytes, xs: Sequence[int], threshold: int, randbelow: RandBelow
) -> list[list[int]]:
    """Share a byte string chunk by chunk: one list of chunk shares per point in ``xs``."""
    chunks = [secret[i : i + CHUNK_BYTES] for i in range(0, len(secret), CHUNK_BYTES)]
    per_chunk = [split(int.from_bytes(c, "big"), xs, threshold, randbelow) for c in chunks]
    return [list(col) for col in zip(*per_chunk, strict=True)] if chunks else [[] for _ in xs]


def combine_bytes(
    xs: Sequence[int],
    shares: Sequence[Sequence[int]],
    length: int,
    coefficients: Sequence[int] | None = None,
) -> bytes:
    """Invert :func:`split_bytes` for a ``length``-byte secret (``coefficients``: cached Lagrange ones)."""
    lam = lagrange_at_zero(xs) if coefficients is None else coefficients
    out = b""
    for i, start in enumerate(range(0, length, CHUNK_BYTES)):
        value = sum(c * s[i] for c, s in zip(lam, shares, strict=True)) % PRIME
        size = min(CHUNK_BYTES, length - start)
        if value >= 1 << (8 * size):
            raise ValueError(
                "the shares do not interpolate to a secret of this length (wrong or too few shares)"
            )
        out += value.to_bytes(size, "big")
    return out
