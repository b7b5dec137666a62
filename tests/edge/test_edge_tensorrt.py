"""TensorRT: skipped with a reason where unusable, never an engine that was not built; GPU tests."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from labsupport.device import tensorrt_status
from labsupport.edge import tensorrt as trt_mod
from labsupport.edge.tensorrt import build_engine

TRT_OK, TRT_DETAIL = tensorrt_status()


@pytest.mark.skipif(TRT_OK, reason="TensorRT is usable here")
def test_without_tensorrt_the_build_is_skipped_with_one_line(tiny_onnx):
    result = build_engine(tiny_onnx, "fp16")
    assert result.engine is None and not result.built
    assert result.reason.startswith("TensorRT skipped") and "\n" not in result.reason


def test_bad_precision_and_missing_file_are_rejected(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        build_engine(tiny_onnx, "int4")
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "none.onnx", "fp32")
    with pytest.raises(ValueError, match="max_batch"):
        build_engine(tiny_onnx, "fp32", max_batch=0)


def _fake_tensorrt(version: str, build_result):
    """A stand-in TensorRT module whose builder returns ``build_result``; records the flags set."""
    flags: list = []
    trt = types.SimpleNamespace(__version__=version)
    trt.Logger = type("Logger", (), {"WARNING": 1, "ERROR": 2, "__init__": lambda self, *a: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="ws")

    class Network:
        def get_input(self, i):
            return types.SimpleNamespace(name="x")

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, f):
            flags.append(f)

        def add_optimization_profile(self, p):
            pass

    class Profile:
        def set_shape(self, *a):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return build_result

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse(self, data):
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt, flags


def test_a_failed_build_raises_instead_of_returning_an_engine(tiny_onnx, monkeypatch):
    fake, _ = _fake_tensorrt("10.3.0", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "tensorrt_status", lambda: (True, "fake TensorRT 10.3.0"))
    with pytest.raises(RuntimeError, match="failed to build"):
        build_engine(tiny_onnx, "fp16")


@pytest.mark.parametrize(("version", "expected"), [("10.3.0", ["FP16"]), ("11.4.0", [])])
def test_precision_flags_only_on_tensorrt_10(tiny_onnx, monkeypatch, tmp_path, version, expected):
    fake, flags = _fake_tensorrt(version, b"engine-bytes")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "tensorrt_status", lambda: (True, f"fake TensorRT {version}"))
    result = build_engine(tiny_onnx, "fp16", out_path=tmp_path / "e.engine")
    assert result.built and result.engine == b"engine-bytes"
    assert (tmp_path / "e.engine").read_bytes() == b"engine-bytes"
    assert flags == expected


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT not usable: {TRT_DETAIL}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_pytorch_on_the_gpu(tiny_cnn, tiny_onnx, mnist1d, tmp_path, precision):
    from labsupport.edge.quantize import ort_static_int8
    from labsupport.edge.tensorrt import TensorRTModel, to_fp16_onnx

    src = tiny_onnx
    if precision == "fp16":
        src = to_fp16_onnx(tiny_onnx, tmp_path / "fp16.onnx")
    elif precision == "int8":
        src = ort_static_int8(
            tiny_onnx, tmp_path / "sym.onnx", mnist1d.x_train[:256], symmetric=True
        )
    result = build_engine(src, precision)
    assert result.built
    run = TensorRTModel(result.engine)
    x = mnist1d.x_test[:64]
    got = run(x.numpy())
    with torch.no_grad():
        ref = tiny_cnn(x).numpy()
    assert got.shape == ref.shape
    assert (got.argmax(1) == ref.argmax(1)).mean() >= (0.99 if precision != "int8" else 0.9)
    assert np.abs(got - ref).max() < (1e-3 if precision == "fp32" else 0.5)
