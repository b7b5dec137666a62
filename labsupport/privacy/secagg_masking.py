"""Secure aggregation's arithmetic: key derivation, the ChaCha20 mask generator, fixed-point encoding.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017),
Section 4: client ``u`` sends

    y_u = x_u + PRG(b_u) + sum_{v in U_2, u < v} PRG(s_{u,v}) - sum_{v in U_2, u > v} PRG(s_{u,v})  (mod R)

where ``s_{u,v} = KA(s_u^SK, s_v^PK)`` is a Diffie-Hellman agreement (X25519 here) run through
HKDF-SHA256, and ``PRG`` expands a 32-byte seed into a vector in ``Z_R``, ``R = 2^bits`` (the
ChaCha20 keystream, a cryptographic PRG). The pairwise masks cancel in ``sum_u y_u``; the self mask
``PRG(b_u)`` is removed with ``b_u`` rebuilt from Shamir shares. Bell et al. (CCS 2020, "SecAgg+")
mask only along the edges of a sparse random graph: :func:`harary_graph` is their construction (a
Harary graph on randomly relabelled nodes).

Inputs are real vectors; the masks live in ``Z_{2^bits}``. :func:`encode_fixed` clips the vector to L2
norm ``clip``, multiplies by the client's weight, scales by ``2^frac_bits`` and rounds
stochastically (unbiased), then stores the signed integers in two's complement mod ``2^bits``. A sum
of ``n`` such vectors decodes correctly only if it never wraps around: :func:`check_wraparound`
refuses any setting where ``n * max_weight * max(clip, 1) * 2^frac_bits + n >= 2^(bits-1)`` before a
round starts. Used by :mod:`labsupport.privacy.secagg` and chapter 02's notebook.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "Drbg",
    "agree",
    "check_wraparound",
    "clip_to_norm",
    "decode_sum",
    "derive_key",
    "encode_fixed",
    "harary_graph",
    "prg",
    "quantization_bound",
]


class Drbg:
    """A deterministic random bit generator: the ChaCha20 keystream under ``SHA-256(label | seed)``.

    The simulation derives every client's keys from a seed so that a run can be repeated; a real
    client would seed it from ``os.urandom(32)`` (``seed=None``).
    """

    def __init__(self, seed: bytes | None = None, label: bytes = b"") -> None:
        key = hashlib.sha256(label + (os.urandom(32) if seed is None else seed)).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def randbelow(self, bound: int) -> int:
        """A uniform integer in ``[0, bound)`` (rejection sampling, no modulo bias)."""
        nbits = max(bound - 1, 1).bit_length()
        while True:
            value = int.from_bytes(self.bytes((nbits + 7) // 8), "big") >> (-nbits % 8)
            if value < bound:
                return value


def derive_key(shared_secret: bytes, info: bytes) -> bytes:
    """32 bytes from HKDF-SHA256 over a key agreement's output, bound to ``info`` (purpose, round, pair)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def agree(private_key: X25519PrivateKey, public_bytes: bytes) -> bytes:
    """X25519 Diffie-Hellman: the shared secret of a private key and a peer's 32-byte public key."""
    return private_key.exchange(X25519PublicKey.from_public_bytes(public_bytes))


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random elements of ``Z_{2^bits}`` (uint64): the ChaCha20 keystream of ``seed``."""
    if len(seed) != 32:
        raise ValueError(f"a PRG seed is 32 bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    out = np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


def check_wraparound(
    num_clients: int, clip: float, frac_bits: int, bits: int, max_weight: float = 1.0
) -> None:
    """Raise ``ValueError`` if a sum of ``num_clients`` encoded vectors could wrap around mod ``2^bits``.

    Every encoded coordinate (and the weight coordinate) is at most ``max_weight * max(clip, 1) *
    2^frac_bits + 1`` in absolute value (``+1``: stochastic rounding), and the signed sum must stay
    below ``2^(bits-1)``.
    """
    if not 8 <= bits <= 64:
        raise ValueError(f"bits must be in [8, 64] (uint64 arithmetic), got {bits}")
    if not 0 <= frac_bits < bits:
        raise ValueError(f"frac_bits must be in [0, bits={bits}), got {frac_bits}")
    if not (clip > 0 and np.isfinite(clip)):
        raise ValueError(f"clip must be a finite norm bound > 0, got {clip}")
    if not (max_weight > 0 and np.isfinite(max_weight)):
        raise ValueError(f"max_weight must be finite and > 0, got {max_weight}")
    worst = num_clients * (max_weight * max(clip, 1.0) * 2.0**frac_bits + 1)
    if worst >= 2.0 ** (bits - 1):
        raise ValueError(
            f"the masked sum would wrap around: n * max_weight * max(clip, 1) * 2^frac_bits = "
            f"{num_clients} * {max_weight:g} * {max(clip, 1.0):g} * 2^{frac_bits} = {worst:.4g} "
            f"does not fit below 2^(bits-1) = 2^{bits - 1} = {2.0 ** (bits - 1):.4g}; lower frac_bits, "
            "clip or max_weight, or use more bits"
        )


def quantization_bound(num_clients: int, frac_bits: int) -> float:
    """Largest error per coordinate of a decoded sum: each client's stochastic rounding is off by < 1 unit."""
    return num_clients / 2.0**frac_bits


def clip_to_norm(x: np.ndarray, clip: float) -> np.ndarray:
    """``x * min(1, clip / ||x||_2)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


def encode_fixed(
    x: np.ndarray,
    weight: float,
    *,
    clip: float,
    frac_bits: int,
    bits: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``[round(w * clip(x) * 2^f), round(w * 2^f)] mod 2^bits`` (uint64): the update and its weight.

    Rounding is stochastic (``floor(z) + Bernoulli(z - floor(z))``), so the encoding is unbiased.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"the update holds {int((~np.isfinite(x)).sum())} non-finite value(s)")
    z = np.append(clip_to_norm(x, clip) * weight, weight) * 2.0**frac_bits
    low = np.floor(z)
    ints = (low + (rng.random(z.shape) < z - low)).astype(np.int64)
    out = ints.view(np.uint64)
    if bits < 64:
        out = out & np.uint64((1 << bits) - 1)
    return out


def decode_sum(total: np.ndarray, frac_bits: int, bits: int) -> np.ndarray:
    """The signed value of a sum in ``Z_{2^bits}``, divided by ``2^frac_bits`` (float64)."""
    total = np.asarray(total, dtype=np.uint64)
    if bits < 64:
        total = total & np.uint64((1 << bits) - 1)
        signed = total.astype(np.int64)
        signed = np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)
    else:
        signed = total.view(np.int64)
    return signed.astype(np.float64) / 2.0**frac_bits


def harary_graph(num_nodes: int, degree: int | None, seed: int) -> list[tuple[int, ...]]:
    """SecAgg+'s public communication graph: each node's neighbours (sorted), excluding itself.

    ``degree=None`` (or ``>= num_nodes - 1``) is the complete graph of the original protocol.
    Otherwise (Bell et al. 2020, Section 3): a Harary graph ``H_{degree, n}`` -- a ring where every
    node links to its ``degree/2`` nearest nodes on each side -- on nodes shuffled by a permutation
    drawn from ``seed``, so everyone can recompute it. ``degree`` must be even.
    """
    if num_nodes < 1:
        raise ValueError(f"need at least one node, got {num_nodes}")
    if degree is None or degree >= num_nodes - 1:
        return [tuple(v for v in range(num_nodes) if v != u) for u in range(num_nodes)]
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even number >= 2 (a Harary graph), got {degree}")
    seed_bytes = struct.pack("<Q", seed % (1 << 64))
    drbg = Drbg(seed_bytes, label=b"labsupport secagg+ graph")
    order = list(range(num_nodes))
    for i in range(num_nodes - 1, 0, -1):  # Fisher-Yates with the DRBG
        j = drbg.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    neighbours: list[set[int]] = [set() for _ in range(num_nodes)]
    for pos, u in enumerate(order):
        for step in range(1, degree // 2 + 1):
            v = order[(pos + step) % num_nodes]
            neighbours[u].add(v)
            neighbours[v].add(u)
    return [tuple(sorted(s)) for s in neighbours]
