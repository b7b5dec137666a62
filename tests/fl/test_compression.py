"""Update compression (chapter 01): round trips, unbiasedness, error feedback, bytes, checkpoints."""

from __future__ import annotations

import functools
import math
import struct

import numpy as np
import pytest
import torch

from labsupport.fl.checkpoint import load_checkpoint, save_checkpoint
from labsupport.fl.clients import DataClient, RoundContext
from labsupport.fl.compression import (
    NoCompression,
    StochasticQuantizer,
    TopK,
    TopKQuantized,
    densify,
    dequantize,
    index_dtype,
    make_compressor,
    num_kept,
    quantize_stochastic,
    topk_sparsify,
)
from labsupport.fl.serialize import deserialize, serialize
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.fl.transforms import UpdateTransform
from labsupport.models import build_model


@functools.cache
def _mlp_shapes() -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_model("mlp", seed=0).state_dict().items()}


def _delta(seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A delta shaped like the MNIST-1D MLP, plus an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    out = {k: scale * torch.randn(shape, generator=g) for k, shape in _mlp_shapes().items()}
    out["bn.num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    return out


def _like(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in delta.items()}


def _wire(c: UpdateTransform, delta: dict[str, torch.Tensor], client: int = 0):
    """What the simulator does: compress, serialize, deserialize, decompress."""
    wire = serialize(c.compress(delta, client))
    return c.decompress(deserialize(wire), _like(delta)), len(wire)


def _data_len(wire: bytes) -> int:
    """Bytes of the data section of a serialized payload (after the length and the JSON header)."""
    (n,) = struct.unpack("<Q", wire[:8])
    return len(wire) - 8 - n


ALL = [
    pytest.param(lambda: NoCompression(), id="none"),
    pytest.param(lambda: TopK(0.1), id="topk"),
    pytest.param(lambda: TopK(0.1, error_feedback=False), id="topk-no-feedback"),
    pytest.param(lambda: StochasticQuantizer(8, seed=3), id="quant8"),
    pytest.param(lambda: TopKQuantized(0.1, bits=8, seed=3), id="topk+quant8"),
]


# ------------------------------------------------------------------------------- round trips


def test_no_compression_round_trip_is_exact():
    delta = _delta()
    out, _ = _wire(NoCompression(), delta)
    assert out.keys() == delta.keys()
    for k in delta:
        assert out[k].dtype == delta[k].dtype and torch.equal(out[k], delta[k]), k


def test_topk_sparsify_keeps_the_k_largest_magnitudes_and_zeros_the_rest():
    t = torch.randn(7, 13, generator=torch.Generator().manual_seed(1))
    k = 9
    idx, val = topk_sparsify(t, k)
    a = t.numpy().reshape(-1)
    expected = np.sort(np.argsort(-np.abs(a), kind="stable")[:k])
    np.testing.assert_array_equal(idx.numpy(), expected)
    np.testing.assert_array_equal(val.numpy(), a[expected])
    dense = densify(idx, val, t.shape).numpy().reshape(-1)
    np.testing.assert_array_equal(dense[expected], a[expected])
    assert np.count_nonzero(dense) == k
    assert np.abs(a[expected]).min() >= np.abs(np.delete(a, expected)).max()


def test_topk_sparsify_breaks_ties_toward_the_lower_index_and_handles_k_zero_and_all():
    t = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0])
    idx, val = topk_sparsify(t, 2)
    assert idx.tolist() == [1, 2] and val.tolist() == [-2.0, 2.0]
    signs = torch.randint(0, 2, (5000,), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    assert topk_sparsify(signs, 50)[0].tolist() == list(range(50))  # all tied: the first 50
    idx, val = topk_sparsify(t, 0)
    assert idx.numel() == 0 and val.numel() == 0
    idx, val = topk_sparsify(t, 5)
    assert torch.equal(densify(idx, val, t.shape), t)


def test_topk_compressor_sends_per_tensor_topk_without_feedback():
    delta = _delta(seed=2)
    out, _ = _wire(TopK(0.05, error_feedback=False), delta)
    for k, d in delta.items():
        if not d.is_floating_point():
            assert torch.equal(out[k], d)
            continue
        a = d.numpy().reshape(-1)
        keep = max(1, round(0.05 * a.size))
        expected = np.zeros_like(a)
        sel = np.argsort(-np.abs(a), kind="stable")[:keep]
        expected[sel] = a[sel]
        np.testing.assert_array_equal(out[k].numpy().reshape(-1), expected, err_msg=k)


def test_num_kept_rounds_and_keeps_at_least_one():
    assert num_kept(10_000, 0.01) == 100
    assert num_kept(10, 0.01) == 1
    assert num_kept(24, 0.1) == 2  # 2.4 rounds down, not up
    assert num_kept(26, 0.1) == 3
    assert num_kept(7, 1.0) == 7
    assert num_kept(0, 0.5) == 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_quantization_error_is_below_one_step(bits):
    t = torch.randn(5000, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    codes, lo, scale = quantize_stochastic(t, bits, torch.Generator().manual_seed(0))
    assert codes.dtype == (torch.uint8 if bits <= 8 else torch.uint16) and codes.shape == t.shape
    assert float(lo) == float(t.min())
    assert float(scale) == pytest.approx(
        (float(t.max()) - float(t.min())) / (2**bits - 1), rel=1e-6
    )
    err = (dequantize(codes, lo, scale) - t).abs().max()
    assert float(err) <= float(scale) * (1 + 1e-5) + 1e-6


def test_constant_and_empty_tensors_quantize_exactly():
    t = torch.full((4, 3), -0.25)
    codes, lo, scale = quantize_stochastic(t, 8)
    assert float(scale) == 0.0 and torch.equal(dequantize(codes, lo, scale), t)
    codes, lo, scale = quantize_stochastic(torch.empty(0), 8)
    assert codes.numel() == 0 and dequantize(codes, lo, scale).numel() == 0


@pytest.mark.parametrize("bits", [1, 8])
def test_quantization_is_unbiased(bits):
    # min/max of the repeated tensor equal those of x, so each column is `draws` independent roundings
    x = torch.linspace(-1.0, 2.0, 101)
    x[[5, 50, 77]] = torch.tensor([0.123456, -0.987654, 1.5])
    draws = 4000
    codes, lo, scale = quantize_stochastic(
        x.repeat(draws, 1), bits, torch.Generator().manual_seed(7)
    )
    mean = dequantize(codes, lo, scale).double().mean(0)
    # one rounding has variance s^2 p (1 - p) <= s^2 / 4: the mean's standard error <= s / (2 sqrt(n))
    tol = 5 * float(scale) / (2 * math.sqrt(draws)) + 1e-6
    assert (mean - x.double()).abs().max() < tol
    # and it is noise, not exact: a single draw errs
    assert not torch.equal(dequantize(codes[0], lo, scale), x)


def test_quantizer_compressor_is_unbiased_across_calls():
    x = torch.randn(40, generator=torch.Generator().manual_seed(3))
    c = StochasticQuantizer(bits=2, seed=0)
    n = 1000
    total = torch.zeros(40, dtype=torch.float64)
    for _ in range(n):
        total += c.decompress(c.compress({"w": x}, client=1), {"w": x})["w"].double()
    step = float(x.max() - x.min()) / 3
    assert (total / n - x.double()).abs().max() < 5 * step / (2 * math.sqrt(n))
    assert c.calls == {1: n}


def test_rounding_is_seeded_by_seed_client_and_call():
    d = {"w": torch.randn(500, generator=torch.Generator().manual_seed(0))}

    def codes(seed, client, calls_before):
        c = StochasticQuantizer(8, seed=seed)
        for _ in range(calls_before):
            c.compress(d, client)
        return c.compress(d, client)["w/codes"]

    assert torch.equal(codes(0, 1, 2), codes(0, 1, 2))
    assert not torch.equal(codes(0, 1, 2), codes(0, 2, 2))
    assert not torch.equal(codes(0, 1, 2), codes(0, 1, 3))
    assert not torch.equal(codes(0, 1, 2), codes(1, 1, 2))


def test_decompress_keeps_the_dtypes_of_the_global_model():
    delta = {
        "h": torch.randn(50, dtype=torch.float16),
        "b": torch.randn(50).to(torch.bfloat16),
        "d": torch.randn(50, dtype=torch.float64),
    }
    for c in (NoCompression(), TopK(0.2), StochasticQuantizer(), TopKQuantized(0.2)):
        payload = c.compress(delta, 0)
        out = c.decompress(deserialize(serialize(payload)), _like(delta))
        assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in delta.items()}
    assert NoCompression().compress(delta, 0)["h/dense"].dtype == torch.float16  # never wider
    assert TopK(0.2).compress(delta, 0)["d/val"].dtype == torch.float32


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: TopK(0.05), id="topk"),
        pytest.param(lambda: TopKQuantized(0.05, bits=4), id="topk+quant4"),
    ],
)
def test_error_feedback_sent_plus_residual_equals_sum_of_deltas(make):
    c = make()
    sent_total = {k: torch.zeros_like(v) for k, v in _delta().items()}
    delta_total = {k: torch.zeros_like(v) for k, v in _delta().items()}
    for t in range(12):
        delta = _delta(seed=100 + t)
        out, _ = _wire(c, delta, client=4)
        for k in delta:
            sent_total[k] += out[k]
            delta_total[k] += delta[k]
    residual = c.state_dict()["residuals"]["4"]
    for k, v in delta_total.items():
        if v.is_floating_point():
            torch.testing.assert_close(sent_total[k] + residual[k], v, rtol=0, atol=1e-6)
            assert residual[k].abs().sum() > 0  # something is still owed
        else:
            assert torch.equal(sent_total[k], v)


def test_without_error_feedback_the_rest_is_dropped_and_nothing_is_kept():
    c = TopK(0.05, error_feedback=False)
    a, _ = _wire(c, _delta(seed=1), client=0)
    b, _ = _wire(c, _delta(seed=1), client=0)
    assert all(torch.equal(a[k], b[k]) for k in a)  # no memory: same input, same output
    assert c.state_dict()["residuals"] == {}


def test_error_feedback_residuals_are_per_client():
    c = TopK(0.05)
    d0, d1 = _delta(seed=1), _delta(seed=2)
    c.compress(d0, 0)
    c.compress(d1, 1)
    r = c.state_dict()["residuals"]
    fresh = TopK(0.05)
    fresh.compress(d1, 1)
    for k in r["1"]:
        assert torch.equal(r["1"][k], fresh.state_dict()["residuals"]["1"][k])
        assert not torch.equal(r["0"][k], r["1"][k])


# ------------------------------------------------------------------------------------- bytes


def test_index_dtype_is_the_smallest_that_holds_every_index():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.uint16
    assert index_dtype(65_536) == torch.uint16
    assert index_dtype(65_537) == torch.uint32


def test_topk_payload_bytes_are_the_raw_indices_and_values_in_the_smallest_dtypes():
    g = torch.Generator().manual_seed(5)
    delta = {"a": torch.randn(300, 300, generator=g), "b": torch.randn(100, 40, generator=g)}
    delta["c"] = torch.randn(10, generator=g)
    payload = TopK(0.01).compress(delta, 0)
    arrays = {}
    for name, dtype in (("a", np.uint32), ("b", np.uint16), ("c", np.uint8)):
        a = delta[name].numpy().reshape(-1)
        keep = np.sort(np.argsort(-np.abs(a), kind="stable")[: max(1, round(0.01 * a.size))])
        arrays[f"{name}/idx"] = keep.astype(dtype)
        arrays[f"{name}/val"] = a[keep].astype(np.float32)
    assert payload.keys() == arrays.keys()
    for k, v in arrays.items():
        assert payload[k].numpy().dtype == v.dtype, k
        np.testing.assert_array_equal(payload[k].numpy(), v, err_msg=k)
    wire = serialize(payload)
    assert _data_len(wire) == sum(v.nbytes for v in arrays.values())


def test_topk_quantized_payload_bytes_are_one_byte_per_code():
    delta = {"w": torch.randn(100, 40, generator=torch.Generator().manual_seed(6))}
    payload = TopKQuantized(0.05, bits=8).compress(delta, 0)
    arrays = {
        "w/idx": np.zeros(200, np.uint16),  # 200 of 4,000 entries: 2-byte indices
        "w/codes": np.zeros(200, np.uint8),  # one byte per 8-bit code
        "w/lo_scale": np.zeros(2, np.float32),
    }
    assert {k: v.numpy().dtype for k, v in payload.items()} == {
        k: v.dtype for k, v in arrays.items()
    }
    assert {k: tuple(v.shape) for k, v in payload.items()} == {
        k: v.shape for k, v in arrays.items()
    }
    assert _data_len(serialize(payload)) == sum(v.nbytes for v in arrays.values()) == 608


def test_topk_at_one_percent_is_over_10x_smaller_than_dense():
    delta = _delta()
    _, dense = _wire(NoCompression(), delta)
    _, sparse = _wire(TopK(0.01), delta)
    assert dense / sparse >= 10


def test_quant8_is_about_4x_smaller_than_float32_for_large_tensors():
    delta = {"w": torch.randn(1000, 1000)}
    _, dense = _wire(NoCompression(), delta)
    _, quant = _wire(StochasticQuantizer(8), delta)
    assert 3.95 < dense / quant <= 4.0


@pytest.mark.parametrize("make", ALL)
def test_integer_and_bool_buffers_are_sent_raw(make):
    delta = {
        "w": torch.randn(20),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "counts": torch.tensor([1, -2, 3], dtype=torch.int32),
    }
    c = make()
    payload = c.compress(delta, 0)
    for k in ("bn.num_batches_tracked", "mask", "counts"):
        assert payload[f"{k}/raw"].dtype == delta[k].dtype
        assert torch.equal(payload[f"{k}/raw"], delta[k])
    out = c.decompress(deserialize(serialize(payload)), _like(delta))
    for k in ("bn.num_batches_tracked", "mask", "counts"):
        assert out[k].dtype == delta[k].dtype and torch.equal(out[k], delta[k])


# ------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("make", ALL)
def test_state_dict_round_trip_reproduces_the_next_payload(make, tmp_path):
    c = make()
    for t in range(3):
        c.compress(_delta(seed=t), client=t % 2)
    save_checkpoint(tmp_path / "c", {"t": c.state_dict()})  # as the server's checkpoint does
    resumed = make()
    resumed.load_state_dict(load_checkpoint(tmp_path / "c")["t"])
    nxt = _delta(seed=9)
    a, b = c.compress(nxt, 1), resumed.compress(nxt, 1)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_state_dict_is_a_copy():
    c = TopK(0.05)
    c.compress(_delta(), 0)
    saved = c.state_dict()
    before = {k: v.clone() for k, v in saved["residuals"]["0"].items()}
    c.compress(_delta(seed=3), 0)
    assert all(torch.equal(saved["residuals"]["0"][k], before[k]) for k in before)


def test_loading_the_state_of_another_config_raises():
    with pytest.raises(ValueError, match="fraction"):
        TopK(0.1).load_state_dict(TopK(0.2).state_dict())
    with pytest.raises(ValueError, match="StochasticQuantizer"):
        TopK(0.1).load_state_dict(StochasticQuantizer().state_dict())
    with pytest.raises(ValueError, match="keys"):
        TopK(0.1).load_state_dict({"residuals": {}})


# -------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_fraction_raises_naming_the_value(fraction):
    with pytest.raises(ValueError, match="fraction") as info:
        TopK(fraction)
    assert repr(fraction) in str(info.value)
    with pytest.raises(ValueError, match="fraction"):
        TopKQuantized(fraction)


@pytest.mark.parametrize("bits", [0, 17, -1, 8.0, True])
def test_bad_bits_raise_naming_the_value(bits):
    with pytest.raises(ValueError, match="bits") as info:
        StochasticQuantizer(bits)
    assert repr(bits) in str(info.value)
    with pytest.raises(ValueError, match="bits"):
        quantize_stochastic(torch.ones(3), bits)


def test_factory_builds_each_name_and_rejects_unknown_ones():
    assert isinstance(make_compressor("none"), NoCompression)
    assert make_compressor("topk", fraction=0.01).fraction == 0.01
    assert make_compressor("quant8", seed=2).bits == 8
    c = make_compressor("topk+quant8", fraction=0.1, error_feedback=False)
    assert isinstance(c, TopKQuantized) and c.bits == 8 and not c.error_feedback
    for name in ("none", "topk", "quant8", "topk+quant8"):
        kw = {"fraction": 0.1} if "topk" in name else {}
        assert isinstance(make_compressor(name, **kw), UpdateTransform)
    with pytest.raises(ValueError, match="'gzip'"):
        make_compressor("gzip")
    with pytest.raises(ValueError, match="bits=4"):
        make_compressor("quant8", bits=4)


def test_decompress_of_a_payload_missing_keys_raises():
    delta = _delta()
    c = TopK(0.1)
    payload = c.compress(delta, 0)
    del payload["fc1.weight/val"]
    with pytest.raises(ValueError, match=r"missing \['fc1.weight/val'\]"):
        c.decompress(payload, _like(delta))
    payload = StochasticQuantizer().compress(delta, 0)  # another compressor's payload
    with pytest.raises(ValueError, match="missing"):
        c.decompress(payload, _like(delta))
    payload = c.compress(delta, 0)
    payload["extra/val"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['extra/val'\]"):
        c.decompress(payload, _like(delta))


def test_decompress_of_a_payload_with_wrong_shapes_raises():
    delta = {"w": torch.randn(10, 4), "n": torch.tensor([1, 2])}
    like = _like(delta)
    bad_dense = {"w/dense": torch.zeros(4, 10), "n/raw": torch.tensor([1, 2])}
    with pytest.raises(
        ValueError, match=r"shape \(4, 10\) for 'w'; the global model has \(10, 4\)"
    ):
        NoCompression().decompress(bad_dense, like)
    bad_raw = {"w/dense": torch.zeros(10, 4), "n/raw": torch.tensor([1, 2, 3])}
    with pytest.raises(ValueError, match="'n'"):
        NoCompression().decompress(bad_raw, like)
    top = TopK(0.1).compress(delta, 0)
    for bad in (
        {"w/idx": torch.tensor([3, 40], dtype=torch.uint8)},  # out of range
        {"w/idx": torch.tensor([5, 2], dtype=torch.uint8)},  # not increasing
        {"w/val": torch.zeros(3)},  # not one value per index
        {"w/idx": torch.zeros(2, 2, dtype=torch.uint8)},  # not 1-D
    ):
        with pytest.raises(ValueError, match="'w"):
            TopK(0.1).decompress({**top, **bad}, like)
    q = StochasticQuantizer(4).compress(delta, 0)
    for bad in (
        {"w/codes": torch.zeros(40, dtype=torch.uint8)},  # flat, not (10, 4)
        {"w/codes": torch.full((10, 4), 16, dtype=torch.uint8)},  # not a 4-bit code
        {"w/lo_scale": torch.zeros(3)},
    ):
        with pytest.raises(ValueError, match="'w"):
            StochasticQuantizer(4).decompress({**q, **bad}, like)
    tq = TopKQuantized(0.1).compress(delta, 0)
    with pytest.raises(ValueError, match="codes"):
        TopKQuantized(0.1).decompress({**tq, "w/codes": torch.zeros(5, dtype=torch.uint8)}, like)


def test_bad_deltas_and_clients_raise():
    with pytest.raises(ValueError, match="non-finite"):
        TopK(0.1).compress({"w": torch.tensor([1.0, float("nan")])}, 0)
    with pytest.raises(ValueError, match="client"):
        TopK(0.1).compress({"w": torch.ones(3)}, -1)
    with pytest.raises(TypeError, match="tensor"):
        TopK(0.1).compress({"w": [1.0, 2.0]}, 0)
    with pytest.raises(ValueError, match="k must be"):
        topk_sparsify(torch.ones(3), 4)
    with pytest.raises(ValueError, match="2 indices but 3 values"):
        densify(torch.tensor([0, 1]), torch.ones(3), (5,))


def test_a_failed_compress_leaves_the_state_unchanged():
    c = TopK(0.1)
    c.compress({"w": torch.randn(10)}, 0)
    before = c.state_dict()
    with pytest.raises(ValueError):
        c.compress({"w": torch.randn(10), "v": torch.tensor([float("inf")])}, 0)
    after = c.state_dict()
    assert after["calls"] == before["calls"]
    assert torch.equal(after["residuals"]["0"]["w"], before["residuals"]["0"]["w"])


# ------------------------------------------------------------------------------- integration


def _federation(num_clients: int = 4, per_client: int = 60, seed: int = 0):
    """Synthetic 40-feature, 10-class data from a random linear teacher (fast, no files)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(40, 10, generator=g)
    x = torch.randn(num_clients * per_client + 200, 40, generator=g)
    y = (x @ teacher).argmax(1)
    clients = [
        DataClient(
            x[i * per_client : (i + 1) * per_client], y[i * per_client : (i + 1) * per_client]
        )
        for i in range(num_clients)
    ]
    test = (x[-200:], y[-200:])
    return clients, test


def _simulation(compressor, **kw) -> FedAvgSimulation:
    clients, test = _federation()
    config = FedAvgConfig(num_rounds=3, fraction_train=1.0, batch_size=20, lr=0.1, seed=0)
    transforms = [] if compressor is None else [compressor]
    return FedAvgSimulation(
        build_model("mlp", seed=0), clients, test, config, transforms=transforms, **kw
    )


def test_fedavg_with_each_compressor_runs_and_bytes_shrink_in_order():
    names = [
        ("none", {}),
        ("quant8", {}),
        ("topk", {"fraction": 0.1}),
        ("topk+quant8", {"fraction": 0.1}),
    ]
    bytes_up, accuracy = {}, {}
    for name, kw in names:
        history = _simulation(make_compressor(name, **kw)).run(progress=False)
        assert len(history) == 3 and not any(r.rejected for r in history.rounds), name
        bytes_up[name] = history.rounds[-1].bytes_up
        accuracy[name] = history.final_accuracy
        assert math.isfinite(accuracy[name]), name
    order = [bytes_up[name] for name, _ in names]
    assert order == sorted(order, reverse=True) and len(set(order)) == 4, bytes_up
    # NoCompression costs what sending the full state costs, give or take the longer key names
    plain = _simulation(None).run(progress=False)
    assert abs(plain.rounds[-1].bytes_up - bytes_up["none"]) < 0.01 * bytes_up["none"]


def test_resumed_simulation_with_error_feedback_matches_an_uninterrupted_run(tmp_path):
    full = _simulation(TopKQuantized(0.1, seed=1))
    full.run(progress=False)
    first = _simulation(TopKQuantized(0.1, seed=1), checkpoint_dir=tmp_path)
    first.run(2, progress=False)
    resumed = _simulation(TopKQuantized(0.1, seed=1), checkpoint_dir=tmp_path)
    assert resumed.round == 2
    assert resumed.pipeline.transforms[0].calls == {0: 2, 1: 2, 2: 2, 3: 2}
    resumed.run(progress=False)
    for k, v in full.global_state.items():
        assert torch.equal(resumed.global_state[k], v), k
    assert resumed.history.column("bytes_up") == full.history.column("bytes_up")


@pytest.mark.parametrize("make", ALL)
def test_encode_and_decode_are_compress_and_decompress_for_the_round_context(make):
    delta = _delta(seed=4)
    a, b = make(), make()
    ctx = RoundContext(server_round=5, client_id=3, seed=123)
    payload = a.encode(delta, ctx)
    want = b.compress(delta, 3)
    assert payload.keys() == want.keys() and all(torch.equal(payload[k], want[k]) for k in want)
    out = a.decode(payload, ctx, _like(delta))
    ref = b.decompress(want, _like(delta))
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert a.config()["name"] == type(a).__name__
