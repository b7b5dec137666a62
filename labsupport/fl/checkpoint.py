"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, one file, atomic.

A checkpoint is a tree of dicts and lists whose leaves are tensors or JSON values (numbers, strings,
booleans, None) -- the global model, the round, the history, the aggregator's and the transforms'
state. :func:`save_checkpoint` replaces every tensor by a reference ``{"__tensor__": "<id>"}``, stores
the tensors with :func:`labsupport.fl.serialize.serialize` and the tree as its JSON metadata, writes a
temporary file and renames it over the old one (a run killed mid-write keeps the previous checkpoint).
:func:`load_checkpoint` reverses it. Nothing is unpickled: a checkpoint from an untrusted source can
at worst fail to load, with a :class:`CheckpointError` that says what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .serialize import PayloadError, deserialize_with_metadata, serialize

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_REF = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint file could not be read: missing, truncated, altered, or not a checkpoint."""


def _flatten(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(tree, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = tree
        return {_REF: key}
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {k!r} at {path or '/'} must be a str or int")
            if k == _REF:
                raise ValueError(f"checkpoint key {_REF!r} is reserved ({path or '/'})")
            out[str(k)] = _flatten(v, tensors, f"{path}/{k}")
        return out
    if isinstance(tree, (list, tuple)):
        return [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(
        f"checkpoint value at {path or '/'} is a {type(tree).__name__}; expected tensors, dicts, "
        "lists and JSON values"
    )


def _unflatten(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_REF}:
            key = tree[_REF]
            if key not in tensors:
                raise CheckpointError(
                    f"checkpoint refers to tensor {key!r}, which it does not hold"
                )
            return tensors[key]
        return {k: _unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def save_checkpoint(path: str | os.PathLike, tree: Mapping[str, Any]) -> None:
    """Write ``tree`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(tree, tensors, "")
    data = serialize(tensors, metadata={"format": "labsupport-checkpoint/1", "tree": meta})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` if it is bad."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    try:
        tensors, meta = deserialize_with_metadata(data)
    except PayloadError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != "labsupport-checkpoint/1":
        raise CheckpointError(f"{path} is not a labsupport checkpoint (format {meta!r})")
    tree = _unflatten(meta.get("tree"), tensors)
    if not isinstance(tree, dict):
        raise CheckpointError(f"checkpoint {path} holds no tree of values")
    return tree
