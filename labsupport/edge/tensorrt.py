"""TensorRT engines from ONNX files, built only where TensorRT is really usable (chapter 04).

TensorRT (NVIDIA) compiles an ONNX graph into an engine for one GPU. Two API generations matter:

* TensorRT 10 (JetPack 6 on Jetson): precision is chosen with builder flags (``BuilderFlag.FP16``,
  ``BuilderFlag.INT8``); INT8 takes its scales from Q/DQ nodes in the ONNX file (the implicit
  calibrator API is deprecated and not used here).
* TensorRT 11: networks are strongly typed -- the precision flags and the INT8 calibrator are gone.
  FP16 comes from an FP16 ONNX file (:func:`to_fp16_onnx`), INT8 from a Q/DQ ONNX file
  (symmetric int8, :func:`labsupport.edge.quantize.ort_static_int8` with ``symmetric=True``).

:func:`build_engine` branches on the major version. Usability is detected by creating a Builder
inside ``try`` (:func:`labsupport.device.tensorrt_status`), not by ``import tensorrt``; without it,
:func:`build_engine` returns a :class:`EngineBuild` with ``engine=None`` and a one-line reason.
An engine is only ever returned when ``build_serialized_network`` produced one: a failed build
raises instead of handing back something that was never built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labsupport.device import tensorrt_status

__all__ = ["PRECISIONS", "EngineBuild", "TensorRTModel", "build_engine", "to_fp16_onnx"]

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class EngineBuild:
    """What :func:`build_engine` did: ``engine`` (serialized bytes) or ``None`` and ``reason``."""

    precision: str
    engine: bytes | None
    reason: str
    path: Path | None = None
    trt_version: str | None = None

    @property
    def built(self) -> bool:
        return self.engine is not None


def to_fp16_onnx(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike) -> Path:
    """An FP16 copy of an ONNX model (inputs/outputs stay float32), for TensorRT 11's FP16."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_in))
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(onnx_out))
    return Path(onnx_out)


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as exc:
        raise ValueError(f"cannot read a TensorRT major version from {version!r}") from exc


def build_engine(
    onnx_path: str | os.PathLike,
    precision: str = "fp16",
    *,
    out_path: str | os.PathLike | None = None,
    max_batch: int = 64,
    input_shape: tuple[int, ...] = (40,),
    workspace_bytes: int = 1 << 28,
) -> EngineBuild:
    """Build a TensorRT engine from ``onnx_path`` (dynamic batch 1..``max_batch``).

    ``precision``: ``fp32``, ``fp16`` (TensorRT 10: flag; 11: pass an FP16 ONNX file) or ``int8``
    (pass a symmetric Q/DQ ONNX file; TensorRT 10 also gets the INT8 flag). Without a usable
    TensorRT the result has ``engine=None`` and ``reason`` says why. Raises ``RuntimeError`` when
    TensorRT is usable but the parse or the build fails.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    usable, detail = tensorrt_status()
    if not usable:
        return EngineBuild(precision, None, f"TensorRT skipped: {detail}")
    import tensorrt as trt  # type: ignore[import-not-found]

    major = _major(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if major >= 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 0  # explicit batch is the only mode since TensorRT 10
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if major < 11:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized may use fp16
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = tuple(int(s) for s in input_shape)
    profile.set_shape(name, (1, *shape), (max_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build a {precision} engine")
    engine = bytes(serialized)
    path = None
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(engine)
    return EngineBuild(
        precision, engine, f"built with TensorRT {trt.__version__}", path, trt.__version__
    )


class TensorRTModel:
    """Runs a serialized engine on the GPU through torch CUDA buffers (numpy in, numpy out)."""

    def __init__(self, engine: bytes) -> None:
        import tensorrt as trt  # type: ignore[import-not-found]
        import torch

        if not engine:
            raise ValueError("engine is empty: build one with build_engine first")
        self._torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) != mode)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(xt.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, xt.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()
