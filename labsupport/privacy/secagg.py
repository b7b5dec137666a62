"""Secure aggregation (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020), over real bytes.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), Figure 4 (honest-but-curious
variant, no signatures and no consistency round). Client ``u`` of ``n`` holds a vector ``x_u``; the
server learns ``sum_u x_u`` over the clients that finished, and nothing else:

0. AdvertiseKeys  -- ``u`` sends two X25519 public keys: ``c_u^PK`` (to encrypt shares) and ``s_u^PK``
                     (to agree on pairwise masks). The server broadcasts the list ``U_1``.
1. ShareKeys      -- ``u`` draws a self-mask seed ``b_u`` and Shamir-shares ``b_u`` and ``s_u^SK``
                     t-out-of-m among its group (itself and its neighbours in ``U_1``), each share
                     encrypted for its holder (ChaCha20-Poly1305 under ``KA(c_u^SK, c_v^PK)``). The
                     server forwards them; the senders are ``U_2``.
2. MaskedInput    -- ``u`` sends ``y_u = x_u + PRG(b_u) +- sum_{v in U_2 ∩ N(u)} PRG(s_{u,v})`` mod 2^bits
                     (:mod:`~labsupport.privacy.secagg_masking`). The senders are ``U_3``.
3. Unmasking      -- the server names the survivors ``U_3`` and the dropped ``U_2 \\ U_3``. Each survivor
                     reveals its share of ``b_v`` for every survivor ``v`` and of ``s_v^SK`` for every
                     dropped ``v`` -- never both for one client (that would unmask ``x_v``): a client
                     refuses such a request, also across two requests. With ``t`` shares of each, the
                     server removes the self masks of the survivors and the survivors' pairwise masks
                     with the dropped, and decodes the sum.

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020): masks and shares only along the edges of a public random
``degree``-regular graph (:func:`~labsupport.privacy.secagg_masking.harary_graph`), the threshold
``t`` applying per neighbourhood; the server's work per dropped client falls from ``O(n)`` to
``O(degree)`` mask expansions. ``degree=None`` is the original protocol.

Every message is bytes in the format of :mod:`~labsupport.privacy.secagg_wire` (no pickle); a
malformed one raises :class:`~labsupport.privacy.secagg_wire.MalformedMessage`, and a round that cannot
finish safely (fewer than ``t`` clients or shares) raises :class:`SecAggAbort` -- never a wrong sum.
:func:`run_protocol` runs all rounds for ``n`` simulated clients with dropouts injected after any round;
:class:`SecAggTransform` plugs the protocol into the FL server's update pipeline. Chapter 02 uses both.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from labsupport.fl.clients import RoundContext
from labsupport.fl.state import StateDict
from labsupport.fl.transforms import RoundAborted, UpdateTransform

from . import secagg_wire as wire
from .secagg_masking import (
    Drbg,
    agree,
    check_wraparound,
    decode_sum,
    derive_key,
    encode_fixed,
    harary_graph,
    prg,
)
from .secagg_wire import MalformedMessage, MsgType, Share
from .shamir import combine_bytes, lagrange_at_zero, split_bytes

__all__ = [
    "STAGES",
    "MalformedMessage",
    "SecAggAbort",
    "SecAggClient",
    "SecAggOutput",
    "SecAggParams",
    "SecAggServer",
    "SecAggTransform",
    "run_protocol",
]

#: The stages after which a client can drop out, in protocol order.
STAGES = ("advertise", "shares", "masked")
SECRET_BYTES = 32


class SecAggAbort(RoundAborted):
    """The round cannot finish safely: too few clients or shares, or an unsafe request."""


@dataclass(frozen=True)
class SecAggParams:
    """The public parameters of one round, which every party knows.

    ``threshold`` is ``t`` per group (a client and its neighbours: ``m = n`` for the complete graph,
    ``degree + 1`` for SecAgg+); it must satisfy ``m/2 < t <= m``. ``None`` picks
    ``max(floor(m/2) + 1, ceil(2m/3))``. Clients' vectors are clipped to L2 norm ``clip``, weighted by at
    most ``max_weight`` and encoded with ``frac_bits`` fractional bits in ``Z_{2^bits}``.
    """

    num_clients: int
    vector_length: int
    clip: float = 1.0
    threshold: int | None = None
    degree: int | None = None
    bits: int = 64
    frac_bits: int = 16
    max_weight: float = 1.0
    graph_seed: int = 0
    server_round: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_clients, int) or self.num_clients < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 clients, got {self.num_clients!r}"
            )
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ValueError(f"vector_length must be an int >= 1, got {self.vector_length!r}")
        if not 0 <= self.server_round < 2**32:
            raise ValueError(f"server_round must fit in 32 bits, got {self.server_round}")
        check_wraparound(self.num_clients, self.clip, self.frac_bits, self.bits, self.max_weight)
        if self.degree is not None and self.degree < self.num_clients - 1:
            harary_graph(self.num_clients, self.degree, 0)  # validates the degree
        m = self.group_size
        t = self.t
        if t > m:
            raise ValueError(
                f"threshold {t} is above the group size {m}: no group could ever reconstruct"
            )
        if 2 * t <= m:
            raise ValueError(
                f"threshold {t} must be more than half the group size {m} (t > {m / 2:g}), or two "
                "disjoint halves could each reconstruct a secret"
            )

    @property
    def group_size(self) -> int:
        """``m``: how many parties hold shares of one client's secrets (itself included)."""
        full = self.degree is None or self.degree >= self.num_clients - 1
        return self.num_clients if full else self.degree + 1

    @property
    def t(self) -> int:
        m = self.group_size
        return self.threshold if self.threshold is not None else max(m // 2 + 1, -(-2 * m // 3))

    @cached_property
    def graph(self) -> list[tuple[int, ...]]:
        return harary_graph(self.num_clients, self.degree, self.graph_seed)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _pair_info(purpose: bytes, server_round: int, u: int, v: int) -> bytes:
    return (
        b"labsupport secagg v1 " + purpose + struct.pack("<III", server_round, min(u, v), max(u, v))
    )


def _mask_seed(private: X25519PrivateKey, peer_public: bytes, rnd: int, u: int, v: int) -> bytes:
    return derive_key(agree(private, peer_public), _pair_info(b"mask", rnd, u, v))


def _nonce(sender: int, recipient: int) -> bytes:
    return struct.pack("<IIxxxx", sender, recipient)


def _as_shares(x: int, per_chunk: list[int]) -> Share:
    return Share(x, tuple(per_chunk))


class SecAggClient:
    """Client ``index``'s side of one round; ``seed`` derives its keys (``None``: ``os.urandom``)."""

    def __init__(self, index: int, params: SecAggParams, seed: bytes | None = None) -> None:
        if not 0 <= index < params.num_clients:
            raise ValueError(f"client index {index} out of range for n = {params.num_clients}")
        self.index, self.params = index, params
        self._drbg = Drbg(seed, label=b"labsupport secagg client")
        self._c_sk = X25519PrivateKey.from_private_bytes(self._drbg.bytes(32))
        self._s_sk_bytes = self._drbg.bytes(32)
        self._s_sk = X25519PrivateKey.from_private_bytes(self._s_sk_bytes)
        self._b = self._drbg.bytes(SECRET_BYTES)
        self._rounding = np.random.default_rng(int.from_bytes(self._drbg.bytes(16), "little"))
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[Share, Share]] = {}  # owner -> (share of s_sk, share of b)
        self._revealed: dict[int, int] = {}  # owner -> kind already revealed
        self.neighbours = set(params.graph[index])

    # round 0
    def advertise(self) -> bytes:
        body = wire.advertise_body(_public_bytes(self._c_sk), _public_bytes(self._s_sk))
        return wire.pack(MsgType.ADVERTISE, self.params.server_round, self.index, body)

    def _share_key(self, v: int) -> ChaCha20Poly1305:
        shared = agree(self._c_sk, self._keys[v][0])
        info = _pair_info(b"share-enc", self.params.server_round, self.index, v)
        return ChaCha20Poly1305(derive_key(shared, info))

    # round 1
    def share_keys(self, key_list: bytes) -> bytes:
        p = self.params
        sender, body = wire.unpack(key_list, MsgType.KEY_LIST, p.server_round, p.num_clients)
        if sender != wire.SERVER:
            raise MalformedMessage(
                f"KEY_LIST message must come from the server, not client {sender}"
            )
        keys = wire.parse_key_list(body, p.num_clients)
        mine = (_public_bytes(self._c_sk), _public_bytes(self._s_sk))
        if keys.get(self.index) != mine:
            raise MalformedMessage(
                f"KEY_LIST message does not carry client {self.index}'s own keys"
            )
        group = sorted(v for v in keys if v in self.neighbours or v == self.index)
        if len(group) < p.t:
            raise SecAggAbort(
                f"client {self.index}: only {len(group)} of its group advertised keys; threshold t = {p.t}"
            )
        self._keys = {v: keys[v] for v in group}
        xs = [v + 1 for v in group]
        s_shares = split_bytes(self._s_sk_bytes, xs, p.t, self._drbg.randbelow)
        b_shares = split_bytes(self._b, xs, p.t, self._drbg.randbelow)
        cts = {}
        for v, x, ss, bs in zip(group, xs, s_shares, b_shares, strict=True):
            pair = (_as_shares(x, ss), _as_shares(x, bs))
            if v == self.index:
                self._held[v] = pair
                continue
            plain = struct.pack("<II", self.index, v) + pair[0].to_bytes() + pair[1].to_bytes()
            aad = struct.pack("<III", p.server_round, self.index, v)
            cts[v] = self._share_key(v).encrypt(_nonce(self.index, v), plain, aad)
        body = wire.ciphertexts_body(cts)
        return wire.pack(MsgType.SHARES, p.server_round, self.index, body)

    # round 2
    def masked_input(self, forwarded: bytes, x: np.ndarray, weight: float = 1.0) -> bytes:
        p = self.params
        if not self._held:
            raise SecAggAbort(f"client {self.index}: masked_input before share_keys")
        if not (0 < weight <= p.max_weight):
            raise ValueError(
                f"client {self.index}: weight {weight} outside (0, max_weight={p.max_weight}]"
            )
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != p.vector_length:
            raise ValueError(
                f"client {self.index}: update has {x.shape[0]} entries; this round's vectors have "
                f"{p.vector_length}"
            )
        sender, body = wire.unpack(forwarded, MsgType.FORWARD, p.server_round, p.num_clients)
        if sender != wire.SERVER:
            raise MalformedMessage(
                f"FORWARD message must come from the server, not client {sender}"
            )
        cts = wire.parse_ciphertexts(body, p.num_clients, "FORWARD")
        for v, ct in cts.items():
            if v not in self._keys or v == self.index:
                raise MalformedMessage(
                    f"FORWARD message carries shares from client {v}, not in this client's group"
                )
            aad = struct.pack("<III", p.server_round, v, self.index)
            try:
                plain = self._share_key(v).decrypt(_nonce(v, self.index), ct, aad)
            except InvalidTag as err:
                raise MalformedMessage(
                    f"FORWARD message: the shares from client {v} fail authentication"
                ) from err
            s_share = Share.from_bytes(plain[8 : 8 + wire.SHARE_BYTES], f"share of client {v}")
            b_share = Share.from_bytes(plain[8 + wire.SHARE_BYTES :], f"share of client {v}")
            if struct.unpack_from("<II", plain) != (v, self.index) or s_share.x != self.index + 1:
                raise MalformedMessage(
                    f"FORWARD message: the shares from client {v} are addressed elsewhere"
                )
            self._held[v] = (s_share, b_share)
        peers = sorted(cts)
        if len(peers) + 1 < p.t:
            raise SecAggAbort(
                f"client {self.index}: only {len(peers) + 1} of its group shared keys; threshold t = {p.t}"
            )
        y = encode_fixed(
            x, weight, clip=p.clip, frac_bits=p.frac_bits, bits=p.bits, rng=self._rounding
        )
        y += prg(self._b, y.shape[0], p.bits)
        for v in peers:
            mask = prg(
                _mask_seed(self._s_sk, self._keys[v][1], p.server_round, self.index, v),
                y.shape[0],
                p.bits,
            )
            if self.index < v:
                y += mask
            else:
                y -= mask
        body = wire.masked_body(y & np.uint64((1 << p.bits) - 1) if p.bits < 64 else y, p.bits)
        return wire.pack(MsgType.MASKED, p.server_round, self.index, body)

    # round 3
    def unmask(self, request: bytes) -> bytes:
        p = self.params
        sender, body = wire.unpack(request, MsgType.UNMASK_REQ, p.server_round, p.num_clients)
        if sender != wire.SERVER:
            raise MalformedMessage(
                f"UNMASK_REQ message must come from the server, not client {sender}"
            )
        alive, dropped = wire.parse_unmask_request(body, p.num_clients)
        alive_set, dropped_set = set(alive), set(dropped)
        if self.index not in alive_set:
            raise SecAggAbort(
                f"client {self.index} is asked to unmask but is not listed as a survivor"
            )
        group_alive = [v for v in alive if v in self._keys]
        if len(group_alive) < p.t:
            raise SecAggAbort(
                f"client {self.index}: only {len(group_alive)} survivors in its group; threshold t = {p.t}"
            )
        entries = []
        for owner in sorted(self._held):
            kind = 0 if owner in alive_set else 1 if owner in dropped_set else None
            if kind is None:
                continue
            if self._revealed.get(owner, kind) != kind:
                raise SecAggAbort(
                    f"client {self.index} already revealed the other secret of client {owner}: "
                    "revealing both would unmask its input"
                )
            self._revealed[owner] = kind
            s_share, b_share = self._held[owner]
            entries.append((owner, kind, b_share if kind == 0 else s_share))
        return wire.pack(MsgType.UNMASK, p.server_round, self.index, wire.unmask_body(entries))


@dataclass
class SecAggOutput:
    """What the server learns: the decoded sum of the survivors' weighted clipped vectors, and who they were."""

    total: np.ndarray  # sum_u w_u * clip(x_u), float64
    weight_sum: float  # sum_u w_u
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.weight_sum


class SecAggServer:
    """The server's side of one round: relays messages and unmasks the sum."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._u2: list[int] = []
        self._u3: list[int] = []
        self._total: np.ndarray | None = None
        self._lagrange: dict[tuple[int, ...], list[int]] = {}

    def _body(self, data: bytes, msg_type: int, claimed: int) -> bytes:
        p = self.params
        sender, body = wire.unpack(data, msg_type, p.server_round, p.num_clients)
        if sender != claimed:
            name = MsgType.NAMES[msg_type]
            raise MalformedMessage(
                f"{name} message arrived from client {claimed} but names client {sender}"
            )
        return body

    def _need(self, have: int, what: str) -> None:
        if have < self.params.t:
            raise SecAggAbort(
                f"only {have} clients {what}; threshold t = {self.params.t}: the round is aborted"
            )

    # round 0 -> 1
    def key_list(self, advertisements: Mapping[int, bytes]) -> bytes:
        self._keys = {
            u: wire.parse_advertise(self._body(m, MsgType.ADVERTISE, u))
            for u, m in advertisements.items()
        }
        self._need(len(self._keys), "advertised keys")
        body = wire.key_list_body(self._keys)
        return wire.pack(MsgType.KEY_LIST, self.params.server_round, wire.SERVER, body)

    # round 1 -> 2
    def forward_shares(self, shares: Mapping[int, bytes]) -> dict[int, bytes]:
        p = self.params
        inbox: dict[int, dict[int, bytes]] = {}
        for u, m in shares.items():
            if u not in self._keys:
                raise MalformedMessage(
                    f"SHARES message from client {u}, which never advertised keys"
                )
            cts = wire.parse_ciphertexts(self._body(m, MsgType.SHARES, u), p.num_clients, "SHARES")
            allowed = set(p.graph[u]) & set(self._keys)
            if set(cts) - allowed:
                raise MalformedMessage(
                    f"SHARES message from client {u} addresses {sorted(set(cts) - allowed)}, outside its group"
                )
            for v, ct in cts.items():
                inbox.setdefault(v, {})[u] = ct
        self._u2 = sorted(shares)
        self._need(len(self._u2), "shared their keys")
        return {
            v: wire.pack(
                MsgType.FORWARD,
                p.server_round,
                wire.SERVER,
                wire.ciphertexts_body({u: c for u, c in inbox.get(v, {}).items() if u in shares}),
            )
            for v in self._u2
        }

    # round 2 -> 3
    def unmask_request(self, masked: Mapping[int, bytes]) -> bytes:
        p = self.params
        total = np.zeros(p.vector_length + 1, dtype=np.uint64)
        for u, m in masked.items():
            if u not in self._u2:
                raise MalformedMessage(
                    f"MASKED message from client {u}, which did not share its keys"
                )
            total += wire.parse_masked(
                self._body(m, MsgType.MASKED, u), p.bits, p.vector_length + 1
            )
        self._u3 = sorted(masked)
        self._need(len(self._u3), "sent masked input")
        self._total = total
        dropped = [u for u in self._u2 if u not in masked]
        body = wire.unmask_request_body(self._u3, dropped)
        return wire.pack(MsgType.UNMASK_REQ, p.server_round, wire.SERVER, body)

    def _reconstruct(self, owner: int, shares: list[Share], what: str) -> bytes:
        t = self.params.t
        if len(shares) < t:
            raise SecAggAbort(
                f"only {len(shares)} shares of client {owner}'s {what} arrived; threshold t = {t}: "
                "the sum cannot be unmasked"
            )
        chosen = sorted(shares, key=lambda s: s.x)[:t]
        xs = tuple(s.x for s in chosen)
        if xs not in self._lagrange:
            self._lagrange[xs] = lagrange_at_zero(xs)
        try:
            return combine_bytes(xs, [s.ys for s in chosen], SECRET_BYTES, self._lagrange[xs])
        except ValueError as err:
            raise SecAggAbort(f"client {owner}'s {what} does not reconstruct: {err}") from err

    # round 3 -> result
    def aggregate(self, responses: Mapping[int, bytes]) -> SecAggOutput:
        p = self.params
        if self._total is None:
            raise SecAggAbort("aggregate called before the masked inputs were collected")
        alive = set(self._u3)
        dropped = [u for u in self._u2 if u not in alive]
        b_shares: dict[int, list[Share]] = {u: [] for u in self._u3}
        s_shares: dict[int, list[Share]] = {u: [] for u in dropped}
        for v, m in responses.items():
            if v not in alive:
                raise MalformedMessage(f"UNMASK message from client {v}, which is not a survivor")
            for owner, kind, share in wire.parse_unmask(
                self._body(m, MsgType.UNMASK, v), p.num_clients
            ):
                if share.x != v + 1:
                    raise MalformedMessage(
                        f"UNMASK message from client {v} holds a share for point {share.x}"
                    )
                if kind == 0 and owner in b_shares:
                    b_shares[owner].append(share)
                elif kind == 1 and owner in s_shares:
                    s_shares[owner].append(share)
                else:
                    raise MalformedMessage(
                        f"UNMASK message from client {v}: a kind-{kind} share of client {owner} was not asked for"
                    )
        self._need(len(responses), "answered the unmasking request")
        total = self._total.copy()
        for u in self._u3:
            total -= prg(
                self._reconstruct(u, b_shares[u], "self-mask seed"), total.shape[0], p.bits
            )
        for u in dropped:
            sk = X25519PrivateKey.from_private_bytes(self._reconstruct(u, s_shares[u], "mask key"))
            if _public_bytes(sk) != self._keys[u][1]:
                raise SecAggAbort(
                    f"client {u}'s reconstructed mask key does not match its advertised public key"
                )
            for v in p.graph[u]:
                if v in alive:  # v added +PRG(s_uv) if v < u, -PRG(s_uv) if v > u
                    mask = prg(
                        _mask_seed(sk, self._keys[v][1], p.server_round, u, v),
                        total.shape[0],
                        p.bits,
                    )
                    if v < u:
                        total -= mask
                    else:
                        total += mask
        values = decode_sum(total, p.frac_bits, p.bits)
        return SecAggOutput(values[:-1], float(values[-1]), tuple(self._u3), tuple(dropped))


def client_seed(seed: int | None, server_round: int, index: int) -> bytes | None:
    """The bytes that seed client ``index``'s keys in a simulated round (``None``: fresh ``os.urandom``)."""
    return None if seed is None else struct.pack("<QII", seed % 2**64, server_round, index)


def run_protocol(
    inputs: np.ndarray,
    params: SecAggParams,
    *,
    weights: Iterable[float] | None = None,
    dropouts: Mapping[str, Iterable[int]] | None = None,
    seed: int | None = 0,
    client_class: type[SecAggClient] | None = None,
) -> SecAggOutput:
    """Run all four rounds for ``n`` simulated clients (row ``u`` of ``inputs`` is client ``u``'s vector).

    ``dropouts[stage]`` lists the clients that vanish right after ``stage`` (one of :data:`STAGES`:
    ``"advertise"``, ``"shares"``, ``"masked"``). ``client_class`` replaces :class:`SecAggClient`
    (chapter 02 plugs in a client that cheats). Every message crosses as bytes; ``stats`` holds each
    client's CPU seconds and bytes sent and received, and the server's seconds.
    """
    x = np.asarray(inputs, dtype=np.float64)
    n, length = params.num_clients, params.vector_length
    if x.shape != (n, length):
        raise ValueError(
            f"inputs must have shape (num_clients, vector_length) = {(n, length)}, got {x.shape}"
        )
    w = np.ones(n) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"need one weight per client ({n}), got {w.shape[0]}")
    drops = {stage: set() for stage in STAGES}
    for stage, ids in (dropouts or {}).items():
        if stage not in drops:
            raise ValueError(f"unknown dropout stage {stage!r}; expected one of {STAGES}")
        drops[stage] = {int(i) for i in ids}
        if any(not 0 <= i < n for i in drops[stage]):
            raise ValueError(
                f"dropout ids for stage {stage!r} must be in [0, {n}), got {sorted(drops[stage])}"
            )
    client_s = np.zeros(n)
    up = np.zeros(n, dtype=np.int64)
    down = np.zeros(n, dtype=np.int64)
    server_s = 0.0

    def timed(i: int, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        client_s[i] += time.perf_counter() - start
        return out

    make = client_class or SecAggClient
    clients = [make(u, params, client_seed(seed, params.server_round, u)) for u in range(n)]
    server = SecAggServer(params)
    active = list(range(n))
    ads = {u: timed(u, clients[u].advertise) for u in active}
    start = time.perf_counter()
    key_list = server.key_list(ads)
    server_s += time.perf_counter() - start
    active = [u for u in active if u not in drops["advertise"]]
    shares = {u: timed(u, clients[u].share_keys, key_list) for u in active}
    start = time.perf_counter()
    forwards = server.forward_shares(shares)
    server_s += time.perf_counter() - start
    active = [u for u in active if u not in drops["shares"]]
    masked = {u: timed(u, clients[u].masked_input, forwards[u], x[u], float(w[u])) for u in active}
    start = time.perf_counter()
    request = server.unmask_request(masked)
    server_s += time.perf_counter() - start
    active = [u for u in active if u not in drops["masked"]]
    responses = {u: timed(u, clients[u].unmask, request) for u in active}
    start = time.perf_counter()
    out = server.aggregate(responses)
    server_s += time.perf_counter() - start
    for u, m in ads.items():
        up[u] += len(m)
        down[u] += len(key_list)
    for u, m in shares.items():
        up[u] += len(m)
        down[u] += len(forwards.get(u, b""))
    for u, m in masked.items():
        up[u] += len(m)
        down[u] += len(request)
    for u, m in responses.items():
        up[u] += len(m)
    out.stats = {
        "client_seconds": client_s,
        "server_seconds": server_s,
        "bytes_up": up,
        "bytes_down": down,
    }
    return out


# --- the FL pipeline stage ---------------------------------------------------------------------


class SecAggTransform(UpdateTransform):
    """Secure aggregation as the last stage of :class:`labsupport.fl.transforms.Pipeline`.

    ``encode`` runs on each client of the round's cohort (``ctx.cohort``; its client ids are mapped to
    protocol indices ``0..n-1`` in sorted order): the first call of a round runs AdvertiseKeys and
    ShareKeys for the whole cohort (in a real deployment each client does its part; here every
    client's keys come from ``(seed, round, index)``), then every client clips its flattened floating
    delta to L2 norm ``clip``, scales it by its weight, encodes and masks it; its payload is the MASKED
    message's bytes as a ``uint8`` tensor under ``"secagg.masked"``. ``aggregate_payloads`` treats the
    clients whose payload did not arrive (or was malformed) as dropped after share distribution, runs
    the Unmasking round with the survivors and returns the weighted mean delta.

    Weights: with ``client_weights=None`` every client has weight 1 (the uniform mean over the
    survivors, which equals FedAvg's only for equal sample counts). With ``client_weights={id: n_k}``
    client ``k`` masks ``n_k * clip(Δ_k)`` and ``n_k`` (``max_weight`` = the largest ``n_k``) and the
    server divides the two sums: FedAvg's weighted mean, without learning any single ``n_k``.
    Integer buffers cannot be averaged under masking: ``integer_buffers="refuse"`` (default) raises
    for models that have them; ``"keep"`` leaves them at the global model's values (the update carries
    no information about them). ``dropouts={stage: p}`` drops each client independently with
    probability ``p`` after that stage (a seeded simulation of unreliable clients).
    """

    sums_payloads = True

    def __init__(
        self,
        clip: float,
        *,
        frac_bits: int = 16,
        bits: int = 64,
        threshold: float = 2 / 3,
        degree: int | None = None,
        client_weights: Mapping[int, float] | None = None,
        integer_buffers: str = "refuse",
        dropouts: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.5 < threshold <= 1:
            raise ValueError(f"threshold is a fraction of the group in (0.5, 1], got {threshold}")
        if integer_buffers not in ("refuse", "keep"):
            raise ValueError(f"integer_buffers must be 'refuse' or 'keep', got {integer_buffers!r}")
        self.dropouts = {s: float(q) for s, q in (dropouts or {}).items()}
        for stage, q in self.dropouts.items():
            if stage not in STAGES or not 0 <= q < 1:
                raise ValueError(
                    f"dropouts maps a stage in {STAGES} to a probability in [0, 1), got {stage!r}: {q}"
                )
        if client_weights is not None and any(not float(w) > 0 for w in client_weights.values()):
            raise ValueError("client_weights must all be > 0")
        check_wraparound(2, clip, frac_bits, bits)
        self.clip, self.frac_bits, self.bits = float(clip), frac_bits, bits
        self.threshold, self.degree, self.seed = threshold, degree, seed
        self.client_weights = (
            None
            if client_weights is None
            else {int(k): float(v) for k, v in client_weights.items()}
        )
        self.integer_buffers = integer_buffers
        self._session: dict[str, Any] | None = None
        self.last_stats: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "clip": self.clip,
            "frac_bits": self.frac_bits,
            "bits": self.bits,
            "threshold": self.threshold,
            "degree": self.degree,
            "client_weights": None
            if self.client_weights is None
            else {str(k): v for k, v in sorted(self.client_weights.items())},
            "integer_buffers": self.integer_buffers,
            "dropouts": self.dropouts,
            "seed": self.seed,
        }

    def _params(self, n: int, length: int, server_round: int) -> SecAggParams:
        degree = self.degree if self.degree is not None and self.degree < n - 1 else None
        m = n if degree is None else degree + 1
        t = max(m // 2 + 1, int(np.ceil(self.threshold * m - 1e-9)))
        max_weight = 1.0 if self.client_weights is None else max(self.client_weights.values())
        return SecAggParams(
            n,
            length,
            clip=self.clip,
            threshold=min(t, m),
            degree=degree,
            bits=self.bits,
            frac_bits=self.frac_bits,
            max_weight=max_weight,
            graph_seed=self.seed * 1_000_003 + server_round,
            server_round=server_round,
        )

    def _setup(self, cohort: tuple[int, ...], length: int, server_round: int) -> dict[str, Any]:
        """AdvertiseKeys and ShareKeys for the whole cohort (the messages cross as bytes)."""
        ids = sorted(set(cohort))
        params = self._params(len(ids), length, server_round)
        rng = np.random.default_rng([self.seed, server_round, 7])
        dropped: dict[str, set[int]] = {}
        gone: set[int] = set()
        for stage in STAGES:  # each client drops at most once, after the first stage it fails
            p_drop = self.dropouts.get(stage, 0.0)
            dropped[stage] = {i for i in range(len(ids)) if rng.random() < p_drop and i not in gone}
            gone |= dropped[stage]
        clients = [
            SecAggClient(i, params, client_seed(self.seed, server_round, i))
            for i in range(len(ids))
        ]
        server = SecAggServer(params)
        key_list = server.key_list({i: c.advertise() for i, c in enumerate(clients)})
        alive = [i for i in range(len(ids)) if i not in dropped["advertise"]]
        forwards = server.forward_shares({i: clients[i].share_keys(key_list) for i in alive})
        return {
            "round": server_round,
            "cohort": tuple(ids),
            "index": {cid: i for i, cid in enumerate(ids)},
            "params": params,
            "clients": clients,
            "server": server,
            "forwards": forwards,
            "dropped": dropped,
        }

    def _flatten(self, delta: Mapping[str, torch.Tensor]) -> np.ndarray:
        parts = []
        for key, value in delta.items():
            if value.is_floating_point():
                parts.append(value.detach().to(torch.float64).reshape(-1).numpy())
            elif self.integer_buffers == "refuse":
                raise ValueError(
                    f"secure aggregation masks floating entries only; {key!r} is {value.dtype} (set "
                    "integer_buffers='keep' to leave integer buffers at the global model's values)"
                )
        if not parts:
            raise ValueError("the update has no floating entries to aggregate")
        return np.concatenate(parts)

    def encode(
        self, delta: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> dict[str, torch.Tensor]:
        if not ctx.cohort or ctx.client_id not in ctx.cohort:
            raise ValueError(
                f"secure aggregation needs the round's cohort in ctx.cohort including client {ctx.client_id}; "
                f"got {ctx.cohort}"
            )
        x = self._flatten(delta)
        s = self._session
        if (
            s is None
            or s["round"] != ctx.server_round
            or s["cohort"] != tuple(sorted(set(ctx.cohort)))
        ):
            s = self._session = self._setup(tuple(ctx.cohort), x.shape[0], ctx.server_round)
        i = s["index"][ctx.client_id]
        if i not in s["forwards"]:
            raise ValueError(
                f"client {ctx.client_id} dropped out before sending masked input (simulated)"
            )
        weight = 1.0 if self.client_weights is None else self.client_weights.get(ctx.client_id)
        if weight is None:
            raise ValueError(f"client_weights has no weight for client {ctx.client_id}")
        msg = s["clients"][i].masked_input(s["forwards"][i], x, weight)
        return {"secagg.masked": torch.frombuffer(bytearray(msg), dtype=torch.uint8)}

    def aggregate_payloads(
        self,
        payloads: Mapping[int, Mapping[str, torch.Tensor]],
        weights: Mapping[int, float],
        server_round: int,
        global_state: StateDict,
    ) -> dict[str, torch.Tensor]:
        s = self._session
        if s is None or s["round"] != server_round:
            raise ValueError(
                f"no secure-aggregation session for round {server_round}: encode never ran"
            )
        params, server = s["params"], s["server"]
        masked, rejected = {}, {}
        for cid, payload in payloads.items():
            i = s["index"].get(cid)
            if i is None or i in s["dropped"]["shares"] or i not in s["forwards"]:
                continue  # not in the cohort, or (simulated) its upload never arrived
            data = payload.get("secagg.masked")
            if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
                rejected[cid] = "payload is not a 1-D uint8 tensor under 'secagg.masked'"
                continue
            msg = data.numpy().tobytes()
            try:  # check it now, so that a malformed one counts as a dropout instead of aborting
                sender, body = wire.unpack(
                    msg, MsgType.MASKED, params.server_round, params.num_clients
                )
                wire.parse_masked(body, params.bits, params.vector_length + 1)
                if sender != i:
                    raise MalformedMessage(f"MASKED message names client {sender}, sent as {i}")
            except MalformedMessage as err:
                rejected[cid] = str(err)
                continue
            masked[i] = msg
        self._session = None
        request = server.unmask_request(masked)
        responders = [i for i in masked if i not in s["dropped"]["masked"]]
        out = server.aggregate({i: s["clients"][i].unmask(request) for i in responders})
        self.last_stats = {
            "survivors": [s["cohort"][i] for i in out.survivors],
            "dropped": [s["cohort"][i] for i in out.dropped],
            "rejected": rejected,
            "simulated_dropouts": {
                stage: [s["cohort"][i] for i in sorted(ids)] for stage, ids in s["dropped"].items()
            },
            "weight_sum": out.weight_sum,
        }
        mean = torch.from_numpy(out.mean)
        result, offset = {}, 0
        for key, ref in global_state.items():
            if ref.is_floating_point():
                size = ref.numel()
                result[key] = mean[offset : offset + size].reshape(ref.shape).to(ref.dtype)
                offset += size
            else:
                result[key] = ref.clone()  # integer buffers: "keep" (encode refused them otherwise)
        if offset != mean.shape[0]:
            raise ValueError(
                f"the decoded sum has {mean.shape[0]} entries; the model's floating ones {offset}"
            )
        return result
