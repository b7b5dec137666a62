"""What crosses the network: a payload of named arrays, serialized, so bytes are counted honestly.

A payload is a mapping of names to tensors or arrays (a state dict, a compressed update with its
values, indices and scales). :func:`serialize` writes it in NumPy's ``.npz`` format -- a zip with a
header per array -- and :func:`payload_nbytes` is the length of exactly those bytes, headers included.
Chapter 01 counts every upload and download with it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["deserialize", "payload_nbytes", "serialize"]

_BF16_TAG = "__bfloat16__"


def _to_numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit pattern
            return t.view(torch.int16).numpy()
        return t.numpy()
    if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
        return np.asarray(value)
    raise TypeError(
        f"payload entry {name!r} is a {type(value).__name__}; expected a tensor or array"
    )


def serialize(payload: Mapping[str, object]) -> bytes:
    """Encode a payload of named tensors/arrays as ``.npz`` bytes (no pickle)."""
    arrays = {}
    bf16 = []
    for name, value in payload.items():
        if not isinstance(name, str) or name.startswith(_BF16_TAG):
            raise ValueError(f"payload key {name!r} must be a string not starting with {_BF16_TAG}")
        arrays[name] = _to_numpy(name, value)
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
            bf16.append(name)
    if bf16:
        arrays[_BF16_TAG] = np.array(bf16)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def deserialize(data: bytes) -> dict[str, torch.Tensor]:
    """Decode :func:`serialize`'s bytes back to tensors."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    bf16 = set(arrays.pop(_BF16_TAG, np.array([], dtype=str)).tolist())
    out = {}
    for name, arr in arrays.items():
        t = torch.from_numpy(arr.copy())
        out[name] = t.view(torch.bfloat16) if name in bf16 else t
    return out


def payload_nbytes(payload: Mapping[str, object]) -> int:
    """Bytes on the wire for ``payload``: the length of its serialization."""
    return len(serialize(payload))
