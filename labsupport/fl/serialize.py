"""What crosses the network: named tensors as safetensors bytes, so bytes are counted honestly.

A payload is a mapping of names to tensors or arrays (a state dict, a compressed update with its
indices, values and scales, a masked vector). :func:`serialize` writes it in the `safetensors
<https://huggingface.co/docs/safetensors>`_ format -- an 8-byte header length, a JSON header with
each tensor's dtype (bfloat16 included), shape and byte range, then the raw data -- and
:func:`payload_nbytes` is the length of exactly those bytes. No pickle: decoding runs no code.

Everything a payload received from a client contains is an attacker's choice, so decoding is strict:

* entry names travel in the header's metadata, not as safetensors keys, so *any* string works as a
  name (``"__metadata__"`` included) and the tensors are stored as ``"0"``, ``"1"``, ...;
* the header carries a SHA-256 digest of the names, the metadata, every tensor's dtype, shape and
  byte range, and the data: a truncated or altered payload (a flipped bit, a dtype or shape changed in
  the header) fails the check instead of decoding to different numbers;
* every failure -- not bytes, a short or oversized header, bad JSON, a missing or wrong digest, a
  tensor that does not fit -- raises :class:`PayloadError` with a message naming what is wrong.

Optional JSON ``metadata`` rides in the same header (checkpoints use it, :mod:`labsupport.fl.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "MAX_HEADER_BYTES",
    "PayloadError",
    "deserialize",
    "deserialize_with_metadata",
    "payload_nbytes",
    "serialize",
]

#: Largest header accepted (safetensors' own limit is 100 MB; ours is smaller: headers are tiny).
MAX_HEADER_BYTES = 16 * 1024 * 1024
_NAMES = "labsupport.names"
_DIGEST = "labsupport.sha256"
_META = "labsupport.metadata"


class PayloadError(ValueError):
    """A payload could not be decoded: truncated, altered, malformed, or not a payload at all."""


def _to_tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:
            raise TypeError(f"payload entry {name!r} is a {t.layout} tensor; expected a dense one")
        return t.to("cpu").contiguous().clone()
    if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"payload entry {name!r} is an object array; expected numbers")
        return torch.from_numpy(np.ascontiguousarray(arr).copy())
    raise TypeError(
        f"payload entry {name!r} is a {type(value).__name__}; expected a tensor or array"
    )


def serialize(payload: Mapping[str, object], metadata: Mapping[str, Any] | None = None) -> bytes:
    """Encode a payload of named tensors/arrays (and optional JSON ``metadata``) as bytes."""
    if not isinstance(payload, Mapping):
        raise TypeError(
            f"payload is a {type(payload).__name__}; expected a mapping of names to tensors"
        )
    names = list(payload)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"payload key {name!r} is a {type(name).__name__}; expected a string")
    tensors = {str(i): _to_tensor(n, payload[n]) for i, n in enumerate(names)}
    # The digest covers names, metadata and data: serialize once without it to get the data bytes.
    meta = {_NAMES: json.dumps(names), _META: json.dumps(metadata, allow_nan=True)}
    if tensors:
        body = _st_save(tensors, metadata=meta)
        header, start = _header(body)
        meta[_DIGEST] = _digest(meta[_NAMES], meta[_META], _entries(header), body[start:])
    else:
        meta[_DIGEST] = _digest(meta[_NAMES], meta[_META], "{}", b"")
    if not tensors:  # safetensors needs no tensor, but keep the format uniform
        header = json.dumps({"__metadata__": meta}).encode()
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header
    return _st_save(tensors, metadata=meta)


def _entries(header: Mapping[str, Any]) -> str:
    """The tensor entries of a header (dtype, shape, byte range) in a canonical JSON form."""
    return json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True)


def _digest(names: str, metadata: str, entries: str, data: bytes) -> str:
    """SHA-256 over names, metadata, every tensor's dtype/shape/offsets, and the data bytes."""
    h = hashlib.sha256()
    for part in (names.encode(), metadata.encode(), entries.encode()):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    h.update(data)
    return h.hexdigest()


def _header(data: bytes) -> tuple[dict, int]:
    """The JSON header and the offset where the data section starts (strictly checked)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload is a {type(data).__name__}; expected bytes")
    data = bytes(data)
    if len(data) < 8:
        raise PayloadError(
            f"payload has {len(data)} bytes; a payload starts with an 8-byte header length"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise PayloadError(
            f"payload header claims {n} bytes but the payload has {len(data) - 8} after the length "
            "field: truncated or not a payload"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"payload header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise PayloadError("payload header has no metadata object; not a labsupport payload")
    return header, 8 + n


def deserialize_with_metadata(data: bytes) -> tuple[dict[str, torch.Tensor], Any]:
    """Decode :func:`serialize`'s bytes: ``(tensors by name, metadata)``; :class:`PayloadError` if bad."""
    header, start = _header(data)
    meta = header["__metadata__"]
    for key in (_NAMES, _DIGEST, _META):
        if not isinstance(meta.get(key), str):
            raise PayloadError(f"payload metadata lacks {key!r}; not a labsupport payload")
    if _digest(meta[_NAMES], meta[_META], _entries(header), bytes(data[start:])) != meta[_DIGEST]:
        raise PayloadError(
            "payload digest does not match its content: the payload was altered or truncated"
        )
    try:
        names = json.loads(meta[_NAMES])
        metadata = json.loads(meta[_META])
    except json.JSONDecodeError as exc:
        raise PayloadError(f"payload metadata is not valid JSON: {exc}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PayloadError("payload names are not a list of strings")
    if len(set(names)) != len(names):
        raise PayloadError("payload names repeat")
    keys = {k for k in header if k != "__metadata__"}
    if keys != {str(i) for i in range(len(names))}:
        raise PayloadError(f"payload holds tensors {sorted(keys)} but names {len(names)} entries")
    if not names:
        return {}, metadata
    try:
        tensors = _st_load(bytes(data))
    except SafetensorError as exc:
        raise PayloadError(f"payload tensors could not be decoded: {exc}") from None
    return {n: tensors[str(i)] for i, n in enumerate(names)}, metadata


def deserialize(data: bytes) -> dict[str, torch.Tensor]:
    """Decode :func:`serialize`'s bytes back to named tensors; :class:`PayloadError` if they are bad."""
    return deserialize_with_metadata(data)[0]


def payload_nbytes(payload: Mapping[str, object]) -> int:
    """Bytes on the wire for ``payload``: the length of its serialization."""
    return len(serialize(payload))
