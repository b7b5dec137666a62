"""The byte format of every secure-aggregation message (no pickle: struct-packed fields, lengths checked).

Bonawitz et al. (CCS 2017), Figure 4, has four rounds, each a message up and one down. Every message
here is a 16-byte header followed by a body; all integers are little-endian:

    header  = magic b"SA" | version u8 (=1) | type u8 | round u32 | sender u32 | body_len u32
    sender  = the client's index in the round (0..n-1), or 0xFFFFFFFF for the server

    type 1 ADVERTISE  (client -> server)   c_pk[32] | s_pk[32]         (X25519 public keys)
    type 2 KEY_LIST   (server -> clients)  count u32 | count x (id u32 | c_pk[32] | s_pk[32])
    type 3 SHARES     (client -> server)   count u32 | count x (recipient u32 | ciphertext[124])
    type 4 FORWARD    (server -> client)   count u32 | count x (sender u32 | ciphertext[124])
    type 5 MASKED     (client -> server)   bits u8 | width u8 | pad u16 | length u32 | length x width bytes
    type 6 UNMASK_REQ (server -> clients)  n_alive u32 | n_alive x id u32 | n_dropped u32 | n_dropped x id u32
    type 7 UNMASK     (client -> server)   count u32 | count x (owner u32 | kind u8 | share[50])

    share      = x u16 | 3 x 16-byte big-endian field elements (a 32-byte secret in 15-byte chunks)
    ciphertext = ChaCha20-Poly1305 of  sender u32 | recipient u32 | share(s_sk) | share(b)  (108 + 16 tag)
    kind       = 0: a share of the owner's self-mask seed b (owner survived)
                 1: a share of the owner's mask private key s_sk (owner dropped)

``width`` is the smallest of 1, 2, 4, 8 bytes that holds ``bits`` bits. Every parser checks the magic,
version, type, declared and actual lengths, counts against the body size, ids against the round's
size, duplicates, and value ranges, and raises :class:`MalformedMessage` naming what was wrong.
Used by :mod:`labsupport.privacy.secagg`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .shamir import PRIME

__all__ = [
    "CIPHERTEXT_BYTES",
    "HEADER",
    "SERVER",
    "SHARE_BYTES",
    "MalformedMessage",
    "MsgType",
    "Share",
    "pack",
    "unpack",
]


class MalformedMessage(ValueError):
    """A secure-aggregation message that does not follow the byte format; the message says what is wrong."""


class MsgType:
    ADVERTISE = 1
    KEY_LIST = 2
    SHARES = 3
    FORWARD = 4
    MASKED = 5
    UNMASK_REQ = 6
    UNMASK = 7
    NAMES: ClassVar[dict[int, str]] = {
        1: "ADVERTISE",
        2: "KEY_LIST",
        3: "SHARES",
        4: "FORWARD",
        5: "MASKED",
        6: "UNMASK_REQ",
        7: "UNMASK",
    }


MAGIC = b"SA"
VERSION = 1
HEADER = struct.Struct("<2sBBIII")
SERVER = 0xFFFFFFFF
CHUNKS = 3  # a 32-byte secret in 15-byte chunks
SHARE_BYTES = 2 + 16 * CHUNKS
PLAINTEXT_BYTES = 8 + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = PLAINTEXT_BYTES + 16
KEY_ENTRY = struct.Struct("<I32s32s")
U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Share:
    """One Shamir share of a 32-byte secret: the point ``x`` and one field element per chunk."""

    x: int
    ys: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return struct.pack("<H", self.x) + b"".join(y.to_bytes(16, "big") for y in self.ys)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "share") -> Share:
        if len(data) != SHARE_BYTES:
            raise MalformedMessage(f"{what}: expected {SHARE_BYTES} bytes, got {len(data)}")
        (x,) = struct.unpack_from("<H", data)
        ys = tuple(int.from_bytes(data[2 + 16 * i : 18 + 16 * i], "big") for i in range(CHUNKS))
        if x == 0:
            raise MalformedMessage(f"{what}: share point x = 0 would be the secret itself")
        if any(y >= PRIME for y in ys):
            raise MalformedMessage(f"{what}: a share value is not a field element (>= 2^127 - 1)")
        return cls(x, ys)


def pack(msg_type: int, server_round: int, sender: int, body: bytes) -> bytes:
    """Header + body."""
    return HEADER.pack(MAGIC, VERSION, msg_type, server_round, sender, len(body)) + body


def unpack(
    data: bytes, expected_type: int, server_round: int, num_clients: int
) -> tuple[int, bytes]:
    """Check the header of a ``expected_type`` message of this round; return ``(sender, body)``."""
    name = MsgType.NAMES.get(expected_type, str(expected_type))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"{name} message: expected bytes, got a {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER.size:
        raise MalformedMessage(
            f"{name} message: {len(data)} bytes is shorter than the {HEADER.size}-byte header"
        )
    magic, version, msg_type, rnd, sender, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage(f"{name} message: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise MalformedMessage(f"{name} message: version {version}, expected {VERSION}")
    if msg_type != expected_type:
        got = MsgType.NAMES.get(msg_type, f"unknown type {msg_type}")
        raise MalformedMessage(f"expected a {name} message, got {got}")
    if rnd != server_round:
        raise MalformedMessage(f"{name} message is for round {rnd}, this is round {server_round}")
    if body_len != len(data) - HEADER.size:
        raise MalformedMessage(
            f"{name} message: header declares a {body_len}-byte body, but {len(data) - HEADER.size} bytes follow"
        )
    if sender != SERVER and sender >= num_clients:
        raise MalformedMessage(
            f"{name} message: sender {sender} is not a client of this round (n = {num_clients})"
        )
    return sender, data[HEADER.size :]


def _count(body: bytes, entry: int, name: str, extra: int = 0) -> int:
    if len(body) < 4:
        raise MalformedMessage(f"{name} message: body too short for its count")
    (count,) = U32.unpack_from(body)
    if len(body) != 4 + count * entry + extra:
        raise MalformedMessage(
            f"{name} message: {count} entries of {entry} bytes need a {4 + count * entry + extra}-byte "
            f"body, got {len(body)}"
        )
    return count


def _check_id(i: int, num_clients: int, seen: set[int], name: str) -> None:
    if i >= num_clients:
        raise MalformedMessage(f"{name} message: client id {i} out of range (n = {num_clients})")
    if i in seen:
        raise MalformedMessage(f"{name} message: client id {i} appears twice")
    seen.add(i)


# --- bodies -----------------------------------------------------------------------------------


def advertise_body(c_pk: bytes, s_pk: bytes) -> bytes:
    return c_pk + s_pk


def parse_advertise(body: bytes) -> tuple[bytes, bytes]:
    if len(body) != 64:
        raise MalformedMessage(
            f"ADVERTISE message: body must be two 32-byte public keys, got {len(body)} bytes"
        )
    return body[:32], body[32:]


def key_list_body(keys: dict[int, tuple[bytes, bytes]]) -> bytes:
    return U32.pack(len(keys)) + b"".join(
        KEY_ENTRY.pack(i, c, s) for i, (c, s) in sorted(keys.items())
    )


def parse_key_list(body: bytes, num_clients: int) -> dict[int, tuple[bytes, bytes]]:
    count = _count(body, KEY_ENTRY.size, "KEY_LIST")
    out: dict[int, tuple[bytes, bytes]] = {}
    for k in range(count):
        i, c, s = KEY_ENTRY.unpack_from(body, 4 + k * KEY_ENTRY.size)
        _check_id(i, num_clients, set(out), "KEY_LIST")
        out[i] = (c, s)
    return out


def ciphertexts_body(cts: dict[int, bytes]) -> bytes:
    for i, ct in cts.items():
        if len(ct) != CIPHERTEXT_BYTES:
            raise ValueError(f"ciphertext for {i} has {len(ct)} bytes, expected {CIPHERTEXT_BYTES}")
    return U32.pack(len(cts)) + b"".join(U32.pack(i) + ct for i, ct in sorted(cts.items()))


def parse_ciphertexts(body: bytes, num_clients: int, name: str) -> dict[int, bytes]:
    entry = 4 + CIPHERTEXT_BYTES
    count = _count(body, entry, name)
    out: dict[int, bytes] = {}
    for k in range(count):
        off = 4 + k * entry
        (i,) = U32.unpack_from(body, off)
        _check_id(i, num_clients, set(out), name)
        out[i] = body[off + 4 : off + entry]
    return out


def _width(bits: int) -> int:
    return next(w for w in (1, 2, 4, 8) if 8 * w >= bits)


def masked_body(values: np.ndarray, bits: int) -> bytes:
    width = _width(bits)
    data = np.asarray(values, dtype=np.uint64).astype(f"<u{width}").tobytes()
    return struct.pack("<BBHI", bits, width, 0, len(values)) + data


def parse_masked(body: bytes, bits: int, length: int) -> np.ndarray:
    if len(body) < 8:
        raise MalformedMessage("MASKED message: body too short for its 8-byte preamble")
    got_bits, width, _, got_len = struct.unpack_from("<BBHI", body)
    if got_bits != bits:
        raise MalformedMessage(f"MASKED message: values mod 2^{got_bits}, this round uses 2^{bits}")
    if width != _width(bits):
        raise MalformedMessage(
            f"MASKED message: width {width} bytes, expected {_width(bits)} for {bits} bits"
        )
    if got_len != length:
        raise MalformedMessage(
            f"MASKED message: vector length {got_len}, this round's vectors have {length}"
        )
    if len(body) != 8 + width * length:
        raise MalformedMessage(
            f"MASKED message: {length} values of {width} bytes need {8 + width * length} bytes, got {len(body)}"
        )
    values = np.frombuffer(body, dtype=f"<u{width}", offset=8).astype(np.uint64)
    if bits < 8 * width and bool((values >> np.uint64(bits)).any()):
        raise MalformedMessage(f"MASKED message: a value is not below 2^{bits}")
    return values


def unmask_request_body(alive: list[int], dropped: list[int]) -> bytes:
    return (
        U32.pack(len(alive))
        + b"".join(U32.pack(i) for i in alive)
        + U32.pack(len(dropped))
        + b"".join(U32.pack(i) for i in dropped)
    )


def parse_unmask_request(body: bytes, num_clients: int) -> tuple[list[int], list[int]]:
    name = "UNMASK_REQ"
    if len(body) < 4:
        raise MalformedMessage(f"{name} message: body too short for its count")
    (n_alive,) = U32.unpack_from(body)
    if len(body) < 8 + 4 * n_alive:
        raise MalformedMessage(
            f"{name} message: {n_alive} survivors do not fit in {len(body)} bytes"
        )
    (n_drop,) = U32.unpack_from(body, 4 + 4 * n_alive)
    if len(body) != 8 + 4 * (n_alive + n_drop):
        raise MalformedMessage(
            f"{name} message: {n_alive} + {n_drop} ids need {8 + 4 * (n_alive + n_drop)} bytes, got {len(body)}"
        )
    seen: set[int] = set()
    alive = [U32.unpack_from(body, 4 + 4 * k)[0] for k in range(n_alive)]
    dropped = [U32.unpack_from(body, 8 + 4 * (n_alive + k))[0] for k in range(n_drop)]
    for i in (
        alive + dropped
    ):  # a repeated id across the lists = asking for both secrets of a client
        _check_id(i, num_clients, seen, name)
    return alive, dropped


UNMASK_ENTRY = 4 + 1 + SHARE_BYTES


def unmask_body(entries: list[tuple[int, int, Share]]) -> bytes:
    return U32.pack(len(entries)) + b"".join(
        U32.pack(owner) + bytes([kind]) + share.to_bytes() for owner, kind, share in entries
    )


def parse_unmask(body: bytes, num_clients: int) -> list[tuple[int, int, Share]]:
    count = _count(body, UNMASK_ENTRY, "UNMASK")
    out, seen = [], set()
    for k in range(count):
        off = 4 + k * UNMASK_ENTRY
        (owner,) = U32.unpack_from(body, off)
        kind = body[off + 4]
        _check_id(owner, num_clients, seen, "UNMASK")
        if kind not in (0, 1):
            raise MalformedMessage(
                f"UNMASK message: share kind {kind} for client {owner}, expected 0 or 1"
            )
        share = Share.from_bytes(
            body[off + 5 : off + UNMASK_ENTRY], f"UNMASK share of client {owner}"
        )
        out.append((owner, kind, share))
    return out
