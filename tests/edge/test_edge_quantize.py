"""Quantization: the naive eager PTQ fails, dynamic quantization skips Conv, and every real route
(PT2E, ONNX Runtime static/dynamic, torchao) keeps the accuracy within bounds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.edge.export import OrtModel, onnx_size_bytes, parity
from labsupport.edge.harness import accuracy
from labsupport.edge.quantize import (
    ArrayCalibrationReader,
    eager_dynamic_int8,
    naive_eager_static_ptq,
    ort_dynamic_int8,
    ort_static_int8,
    pt2e_qat_int8,
    pt2e_static_int8,
    quantized_backend,
    tensor_bytes,
    torchao_int8_linear,
)
from labsupport.models import MLP


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_naive_eager_static_ptq_fails_and_changes_the_callers_model(tiny_cnn, mnist1d):
    model = copy.deepcopy(tiny_cnn)
    out = naive_eager_static_ptq(model, mnist1d.x_train[:64])
    assert out["error"] is not None and out["error_type"]
    assert out["converted"]  # conversion "worked"; running it is what fails
    assert any("quantized" in type(m).__module__ for m in model.modules())  # caller's object
    assert not any("quantized" in type(m).__module__ for m in tiny_cnn.modules())


@pytest.mark.parametrize(
    ("machine", "backend"),
    [("x86_64", "x86"), ("AMD64", "x86"), ("aarch64", "qnnpack"), ("armv7l", "qnnpack")],
)
def test_backend_is_named_per_platform(machine, backend):
    assert quantized_backend(machine) == backend
    assert backend in torch.backends.quantized.supported_engines


def test_unknown_platform_has_no_backend():
    with pytest.raises(ValueError, match="riscv64"):
        quantized_backend("riscv64")


def test_dynamic_quantization_leaves_every_conv_layer_in_fp32(tiny_cnn):
    q, report = eager_dynamic_int8(tiny_cnn)
    assert report["quantized"] == ["fc"]
    assert report["left_fp32"] == ["conv1", "conv2", "conv3"]
    assert "deprecated" in report["deprecation"]
    assert isinstance(tiny_cnn.fc, nn.Linear)  # the original is untouched
    assert all(isinstance(getattr(q, c), nn.Conv1d) for c in ("conv1", "conv2", "conv3"))


def test_pt2e_static_int8_keeps_accuracy_and_takes_any_batch(tiny_cnn, mnist1d):
    q = pt2e_static_int8(tiny_cnn, mnist1d.x_train[:512])
    x, y = mnist1d.x_test, mnist1d.y_test
    assert abs(_acc(q, x, y) - _acc(tiny_cnn, x, y)) <= 0.02
    for b in (1, 7):
        assert q(x[:b]).shape == (b, 10)
    assert tensor_bytes(q) < 0.5 * tensor_bytes(tiny_cnn)  # int8 weights are folded in


def test_pt2e_rejects_a_batch_one_example(tiny_cnn, mnist1d):
    with pytest.raises(ValueError, match="example_batch"):
        pt2e_static_int8(tiny_cnn, mnist1d.x_train[:8], example_batch=1)
    with pytest.raises(ValueError, match="calib"):
        pt2e_static_int8(tiny_cnn, mnist1d.x_train[:0])


@pytest.mark.slow
def test_pt2e_qat_trains_and_converts(tiny_cnn, mnist1d):
    q = pt2e_qat_int8(tiny_cnn, mnist1d.x_train, mnist1d.y_train, steps=20, lr=1e-4)
    x, y = mnist1d.x_test, mnist1d.y_test
    assert abs(_acc(q, x, y) - _acc(tiny_cnn, x, y)) <= 0.03


def test_ort_static_int8_is_smaller_and_within_two_points(tiny_cnn, tiny_onnx, mnist1d, tmp_path):
    out = ort_static_int8(tiny_onnx, tmp_path / "int8.onnx", mnist1d.x_train[:512])
    assert not list(tmp_path.glob("*_pre.onnx"))
    assert onnx_size_bytes(out) < onnx_size_bytes(tiny_onnx)
    run = OrtModel(out, ["CPUExecutionProvider"])
    x, y = mnist1d.x_test.numpy(), mnist1d.y_test.numpy()
    fp32 = accuracy(OrtModel(tiny_onnx, ["CPUExecutionProvider"]), x, y)
    assert abs(accuracy(run, x, y) - fp32) <= 0.02
    assert parity(tiny_cnn, run, mnist1d.x_test[:256])["argmax_agreement"] >= 0.95


def test_symmetric_int8_has_zero_activation_zero_points(tiny_onnx, mnist1d, tmp_path):
    import onnx
    from onnx import numpy_helper

    out = ort_static_int8(tiny_onnx, tmp_path / "sym.onnx", mnist1d.x_train[:256], symmetric=True)
    proto = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    zps = [
        inits[n.input[2]]
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2
    ]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)


def test_ort_dynamic_int8_runs_and_stays_close(tiny_onnx, mnist1d, tmp_path):
    out = ort_dynamic_int8(tiny_onnx, tmp_path / "dyn.onnx")
    x, y = mnist1d.x_test.numpy(), mnist1d.y_test.numpy()
    fp32 = accuracy(OrtModel(tiny_onnx, ["CPUExecutionProvider"]), x, y)
    assert abs(accuracy(OrtModel(out, ["CPUExecutionProvider"]), x, y) - fp32) <= 0.03


def test_calibration_reader_yields_every_sample_once_per_pass():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    reader = ArrayCalibrationReader(x, batch_size=16)
    for _ in range(2):
        got = []
        while (batch := reader.get_next()) is not None:
            got.append(batch["x"])
        np.testing.assert_array_equal(np.concatenate(got), x)
        assert [len(b) for b in got] == [16, 16, 16, 2]
        reader.rewind()


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros(5)])
def test_calibration_reader_rejects_empty_or_flat_data(bad):
    with pytest.raises(ValueError, match="calibration"):
        ArrayCalibrationReader(bad)


def test_torchao_quantizes_linear_only_and_stays_close():
    torch.manual_seed(0)
    m = MLP().eval()
    q = torchao_int8_linear(m)
    x = torch.randn(32, 40)
    with torch.no_grad():
        np.testing.assert_allclose(q(x).numpy(), m(x).numpy(), atol=0.05)
    assert type(q.fc1.weight) is not torch.nn.Parameter  # a torchao int8 tensor subclass
    assert type(m.fc1.weight) is torch.nn.Parameter


def test_pt2e_quantizes_every_conv_only_with_relu_modules(tiny_cnn, mnist1d):
    from labsupport.edge.quantize import int8_weight_layers

    calib = mnist1d.x_train[:128]
    assert int8_weight_layers(pt2e_static_int8(tiny_cnn, calib, relu_modules=False)) == 1
    assert int8_weight_layers(pt2e_static_int8(tiny_cnn, calib)) == 4


def test_tensor_bytes_counts_int8_as_one_byte():
    model = nn.Sequential(nn.Linear(10, 4, bias=False))
    assert tensor_bytes(model) == 4 * 10 * 4
    model.register_buffer("codes", torch.zeros(7, dtype=torch.int8))
    assert tensor_bytes(model) == 4 * 10 * 4 + 7


def test_pt2e_result_can_be_evaluated_like_any_model(tiny_cnn, mnist1d):
    from labsupport.train import evaluate

    q = pt2e_static_int8(tiny_cnn, mnist1d.x_train[:128])
    acc = evaluate(q, mnist1d.x_test, mnist1d.y_test)["accuracy"]
    assert acc == pytest.approx(_acc(q, mnist1d.x_test, mnist1d.y_test))


def test_harness_sizes_a_pt2e_graph_by_the_tensors_it_reads(tiny_cnn, mnist1d):
    from labsupport.edge.harness import torch_variant

    q = pt2e_static_int8(tiny_cnn, mnist1d.x_train[:128])
    v, ref = torch_variant("pt2e", q), torch_variant("fp32", tiny_cnn)
    assert v.size_kind == "tensors" and ref.size_kind == "file"
    assert v.size_bytes < 0.5 * ref.size_bytes
