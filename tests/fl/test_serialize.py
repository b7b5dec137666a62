"""The wire format (labsupport.fl.serialize), attacked: every payload from a client is hostile input.

Any truncated, altered or malformed payload must raise PayloadError with a message -- never decode
to different data. A changed byte may only ever decode to exactly the original payload.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from labsupport.fl.serialize import (
    MAX_HEADER_BYTES,
    PayloadError,
    deserialize,
    deserialize_with_metadata,
    payload_nbytes,
    serialize,
)


def _small():
    return {
        "w": torch.tensor([[1.5, -2.0], [0.25, 3.0]]),
        "n": torch.tensor(7, dtype=torch.int64),
        "m": torch.tensor([True, False, True]),
    }


def _equal(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


# ------------------------------------------------------------------------------ round trips
def test_every_dtype_and_shape_round_trips_exactly():
    payload = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(5, dtype=torch.float64),
        "f16": torch.randn(2, 2).half(),
        "bf16": torch.tensor([1.0, -3.140625, 1e30, 2.0**-120]).to(torch.bfloat16),
        "i64": torch.tensor([2**63 - 1, -(2**63), 0, 2**53 + 1]),
        "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(-4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    out = deserialize(serialize(payload))
    assert _equal(out, payload)
    assert out["scalar"].dim() == 0 and out["empty"].shape == (0, 3)
    assert list(out) == list(payload)  # order kept


def test_numpy_arrays_and_python_numbers_are_accepted():
    out = deserialize(serialize({"a": np.arange(3, dtype=np.int16), "x": 2.5, "b": True}))
    assert out["a"].dtype == torch.int16 and out["a"].tolist() == [0, 1, 2]
    assert out["x"].item() == 2.5 and out["b"].item() is True


def test_non_contiguous_views_are_sent_as_their_values():
    base = torch.arange(12.0).reshape(3, 4)
    out = deserialize(serialize({"t": base.t(), "s": base[:, 1]}))
    assert torch.equal(out["t"], base.t()) and torch.equal(out["s"], base[:, 1])


@pytest.mark.parametrize(
    "names",
    [
        [""],
        ["__metadata__"],
        ["π/δ", "模型.权重", "🙂"],
        ["a/b", "a", "b"],
        ["1", "0"],  # the internal storage keys, in the other order
        ["labsupport.names", "labsupport.sha256"],
        ['"quoted"', "back\\slash", "new\nline"],
    ],
)
def test_any_entry_name_works(names):
    payload = {n: torch.full((2,), float(i)) for i, n in enumerate(names)}
    assert _equal(deserialize(serialize(payload)), payload)


def test_empty_payload_and_metadata_round_trip():
    assert deserialize(serialize({})) == {}
    meta = {"round": 3, "eps": [0.5, None], "name": "π"}
    tensors, back = deserialize_with_metadata(serialize({"w": torch.ones(2)}, metadata=meta))
    assert back == meta and torch.equal(tensors["w"], torch.ones(2))
    assert deserialize_with_metadata(serialize({}, metadata=meta)) == ({}, meta)


def test_payload_nbytes_is_the_serialized_length():
    payload = _small()
    assert payload_nbytes(payload) == len(serialize(payload))


def test_the_data_section_is_exactly_the_raw_tensor_bytes():
    payload = {"idx": torch.arange(100).to(torch.uint16), "val": torch.randn(100)}
    wire = serialize(payload)
    (n,) = struct.unpack("<Q", wire[:8])
    assert len(wire) == 8 + n + 100 * 2 + 100 * 4


@pytest.mark.parametrize(
    ("payload", "error", "message"),
    [
        ([1, 2], TypeError, "expected a mapping"),
        ({1: torch.ones(1)}, TypeError, "expected a string"),
        ({"a": "text"}, TypeError, "expected a tensor or array"),
        ({"a": np.array([object()])}, TypeError, "object array"),
        ({"a": torch.ones(2).to_sparse()}, TypeError, "dense"),
    ],
)
def test_what_cannot_be_sent_is_refused_when_serializing(payload, error, message):
    with pytest.raises(error, match=message):
        serialize(payload)


# ------------------------------------------------------------------------------ attacks
def _decode_or_error(data, original):
    """Decoding altered bytes must raise PayloadError (with a message) or give the original."""
    try:
        out = deserialize(data)
    except PayloadError as exc:
        assert str(exc)
        return "error"
    assert _equal(out, original), "altered bytes decoded to different data"
    return "same"


def test_every_truncation_raises():
    payload = _small()
    wire = serialize(payload)
    for cut in range(len(wire)):
        with pytest.raises(PayloadError):
            deserialize(wire[:cut])


def test_trailing_bytes_raise():
    wire = serialize(_small())
    for extra in (b"\x00", b"junk", wire):
        with pytest.raises(PayloadError, match="digest"):
            deserialize(wire + extra)


@pytest.mark.parametrize("mask", [0x01, 0x20, 0x80, 0xFF])
def test_flipping_any_byte_of_a_small_payload_never_decodes_to_other_data(mask):
    payload = _small()
    wire = bytearray(serialize(payload))
    outcomes = []
    for pos in range(len(wire)):
        altered = bytearray(wire)
        altered[pos] ^= mask
        outcomes.append(_decode_or_error(bytes(altered), payload))
    # the data bytes and the digest are covered: nearly every flip must be an error
    assert outcomes.count("error") >= len(wire) - 8, outcomes.count("same")


def test_flipping_sampled_bytes_of_a_large_payload_never_decodes_to_other_data():
    payload = {f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    wire = serialize(payload)
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(wire), size=300, replace=False):
        altered = bytearray(wire)
        altered[pos] ^= 1 << int(rng.integers(8))
        assert _decode_or_error(bytes(altered), payload) == "error"


def _split(wire):
    (n,) = struct.unpack("<Q", wire[:8])
    return json.loads(wire[8 : 8 + n]), wire[8 + n :]


def _join(header, data, pad=True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _forge(header, data):
    """Recompute the digest as the module documents it -- what a careful forger would do."""
    meta = header["__metadata__"]
    entries = json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True)
    h = hashlib.sha256()
    for part in (meta["labsupport.names"], meta["labsupport.metadata"], entries):
        h.update(struct.pack("<Q", len(part.encode())))
        h.update(part.encode())
    h.update(data)
    meta["labsupport.sha256"] = h.hexdigest()
    return _join(header, data)


def test_the_forge_helper_reproduces_a_genuine_payload():
    wire = serialize(_small())
    header, data = _split(wire)
    assert _equal(deserialize(_forge(header, data)), _small())


@pytest.mark.parametrize(
    ("edit", "what"),
    [
        (lambda h: h["0"].update(dtype="I32"), "dtype"),
        (lambda h: h["0"].update(dtype="F16"), "dtype"),
        (lambda h: h["0"].update(shape=[4]), "shape"),
        (lambda h: h["0"].update(shape=[2, 1]), "shape"),
        (lambda h: h["0"].update(data_offsets=[0, 8]), "byte range"),
        (lambda h: h["__metadata__"].update({"labsupport.names": '["x", "n", "m"]'}), "names"),
        (lambda h: h["__metadata__"].update({"labsupport.metadata": '{"round": 2}'}), "metadata"),
    ],
)
def test_a_changed_header_without_a_matching_digest_raises(edit, what):
    header, data = _split(serialize(_small()))
    edit(header)
    with pytest.raises(PayloadError, match="digest does not match"):
        deserialize(_join(header, data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["__metadata__"].update({"labsupport.names": '["w", "w", "m"]'}), "repeat"),
        (lambda h: h["__metadata__"].update({"labsupport.names": '["w", "n"]'}), "names 2 entries"),
        (
            lambda h: h["__metadata__"].update({"labsupport.names": '["w", 1, "m"]'}),
            "list of strings",
        ),
        (lambda h: h["__metadata__"].update({"labsupport.names": '{"w": 0}'}), "list of strings"),
        (lambda h: h["__metadata__"].update({"labsupport.names": "not json"}), "not valid JSON"),
        (lambda h: h["0"].update(shape=[5]), "could not be decoded"),  # 16 bytes for 5 floats
        (lambda h: h["0"].update(dtype="F64", shape=[3]), "could not be decoded"),
        (lambda h: h["0"].update(data_offsets=[0, 64]), "could not be decoded"),
        (lambda h: h["0"].update(dtype="XX"), "could not be decoded"),
        (lambda h: h.update({"3": dict(h["2"])}), "holds tensors"),
    ],
)
def test_a_forged_but_inconsistent_payload_raises(edit, message):
    header, data = _split(serialize(_small()))
    edit(header)
    with pytest.raises(PayloadError, match=message):
        deserialize(_forge(header, data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "8-byte header length"),
        (b"\x01\x02\x03", "8-byte header length"),
        (struct.pack("<Q", 2**63) + b"{}", "truncated or not a payload"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * 16, "truncated or not a payload"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "no metadata object"),
        (struct.pack("<Q", 2) + b"{}", "no metadata object"),
        (_join({"__metadata__": {}}, b""), "lacks 'labsupport.names'"),
        (
            _join({"__metadata__": {"labsupport.names": "[]", "labsupport.sha256": "x"}}, b""),
            "lacks",
        ),
        (st_save({"w": torch.ones(2)}), "no metadata object"),  # a plain safetensors file
        (st_save({"w": torch.ones(2)}, metadata={"k": "v"}), "lacks"),
        (b"PK\x03\x04" + bytes(40), "truncated or not a payload"),  # a zip (torch.save / npz)
        (b"\x80\x04\x95" + bytes(40), "truncated or not a payload"),  # a pickle
    ],
)
def test_malformed_bytes_raise_a_payload_error_with_a_message(data, message):
    with pytest.raises(PayloadError, match=message):
        deserialize(data)


@pytest.mark.parametrize("data", [None, "text", 3, [1, 2]])
def test_what_is_not_bytes_raises_a_payload_error(data):
    with pytest.raises(PayloadError, match="expected bytes"):
        deserialize(data)


def test_a_payload_error_is_a_value_error_so_the_server_rejects_the_client():
    assert issubclass(PayloadError, ValueError)
