"""Post-training quantization and quantization-aware training, every route chapter 04 compares.

Uniform affine int8 quantization (Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018): ``q = clamp(round(x / s) + z, -128, 127)``,
``x ≈ s (q - z)``, with scale ``s`` and zero point ``z`` per tensor or per output channel.

* :func:`naive_eager_static_ptq` -- the naive pattern: eager ``torch.ao.quantization`` static PTQ with
  no ``QuantStub``/``DeQuantStub`` and no fusion, ``inplace=True``. Conversion "succeeds", then the
  first forward pass fails (a float tensor reaches a quantized kernel); the error is caught and
  returned, and the caller's model has been changed in place.
* :func:`quantized_backend` -- the quantized engine per platform: ``x86`` (fbgemm + oneDNN) on
  x86-64, ``qnnpack`` on ARM (a Jetson, a Raspberry Pi, a phone).
* :func:`pt2e_static_int8` -- static PTQ the current way: ``torch.export`` (example batch > 1, dynamic
  batch), ``prepare_pt2e`` / ``convert_pt2e`` from ``torchao.quantization.pt2e`` with the
  ``X86InductorQuantizer``. Without ``torch.compile`` the result is the *reference* Q/DQ model
  (correct numerics, fp32 kernels): for accuracy, not speed.
  ``X86InductorQuantizer`` matches *module* patterns: it quantizes Conv1d only when an ``nn.ReLU``
  module follows, so a CNN1D (functional ``torch.relu``) is rewritten first
  (:func:`int8_weight_layers` counts what was quantized).
* :func:`pt2e_qat_int8` -- QAT of the same graph (``prepare_qat_pt2e``), fine-tuned through
  :func:`labsupport.train.train`.
* :func:`torchao_int8_linear` -- torchao ``quantize_`` (it rewrites ``nn.Linear`` only);
  :func:`torchao_qat_linear` -- torchao ``QATConfig`` prepare/convert around fine-tuning.
* :func:`eager_dynamic_int8` -- ``torch.ao.quantization.quantize_dynamic`` (deprecated): it quantizes
  Linear layers only and leaves every Conv layer in fp32; the report says which were skipped.
* :func:`ort_static_int8` / :func:`ort_dynamic_int8` -- ONNX Runtime quantization, the CPU
  deployment path: static QDQ with a calibration data reader (:class:`ArrayCalibrationReader`),
  optionally symmetric (what TensorRT needs), and dynamic.
"""

from __future__ import annotations

import copy
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labsupport.edge.export import strip_onnx_metadata

__all__ = [
    "ArrayCalibrationReader",
    "eager_dynamic_int8",
    "int8_weight_layers",
    "naive_eager_static_ptq",
    "ort_dynamic_int8",
    "ort_static_int8",
    "pt2e_qat_int8",
    "pt2e_static_int8",
    "quantized_backend",
    "tensor_bytes",
    "torchao_int8_linear",
    "torchao_ptq_linear",
    "torchao_qat_linear",
]


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model computes with, int8 counted as 1 byte per value.

    For an FX graph (a PT2E result) only the attributes the graph reads (``get_attr`` nodes); for
    other modules the state dict, with torchao tensor subclasses counted by their inner tensors.
    For in-memory PyTorch variants that have no no-pickle file format; ONNX variants use their
    size on disk instead.
    """
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    if isinstance(model, torch.fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "get_attr":
                value = model
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    add(value.data if isinstance(value, nn.Parameter) else value)
        return total
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor):
            add(t)
    return total


def int8_weight_layers(model: nn.Module) -> int:
    """How many int8 weight tensors a PT2E-converted graph holds (one per quantized Conv/Linear)."""
    if not isinstance(model, torch.fx.GraphModule):
        raise TypeError(
            f"expected a PT2E-converted torch.fx.GraphModule, got {type(model).__name__}"
        )
    return sum(1 for _, b in model.named_buffers() if b.dtype == torch.int8)


class _ReluModulesCNN1D(nn.Module):
    """CNN1D with ``nn.ReLU`` modules instead of ``torch.relu`` (same layers, same numbers).

    ``X86InductorQuantizer`` finds Conv1d only in a ``Conv1d -> nn.ReLU`` *module* pattern; behind a
    functional ``torch.relu`` the three Conv1d layers stay fp32 and only the Linear is quantized.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.fc = (
            model.conv1,
            model.conv2,
            model.conv3,
            model.fc,
        )
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, -1)
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def _pt2e_ready(model: nn.Module, relu_modules: bool) -> nn.Module:
    from labsupport.models import CNN1D

    m = copy.deepcopy(model)
    return _ReluModulesCNN1D(m) if relu_modules and isinstance(m, CNN1D) else m


def quantized_backend(machine: str | None = None) -> str:
    """``"x86"`` on x86-64, ``"qnnpack"`` on ARM; ``machine`` defaults to ``platform.machine()``."""
    m = (machine if machine is not None else platform.machine()).lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if m.startswith(("arm", "aarch64")):
        return "qnnpack"
    raise ValueError(
        f"no quantized backend known for machine {m!r}; expected x86_64 or aarch64/arm*"
    )


def naive_eager_static_ptq(model: nn.Module, calib_x: torch.Tensor) -> dict:
    """Run the naive eager static PTQ on ``model`` *in place* and report what happened.

    Returns ``{"converted": bool, "error": str | None, "error_type": str | None}``; the model is
    left as the failed attempt made it (observers or quantized modules inside the caller's object).
    """
    import torch.ao.quantization as tq

    out: dict = {"converted": False, "error": None, "error_type": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.eval()
            model.qconfig = tq.get_default_qconfig(quantized_backend())
            tq.prepare(model, inplace=True)
            model(calib_x)
            tq.convert(model, inplace=True)
            out["converted"] = True
            model(calib_x[:2])
        except Exception as exc:  # the point: show the error, whatever the torch version raises
            out["error"] = str(exc).splitlines()[0][:300]
            out["error_type"] = type(exc).__name__
    return out


def _export_for_quant(
    model: nn.Module, input_shape: tuple[int, ...], example_batch: int
) -> torch.fx.GraphModule:
    if example_batch < 2:
        raise ValueError(
            f"example_batch must be >= 2 (got {example_batch}): torch.export specializes a size-1 "
            "batch to a constant and the quantized model then rejects every other batch size"
        )
    x = torch.randn(example_batch, *input_shape)
    dyn = {"x": {0: torch.export.Dim("batch", min=1)}}
    return torch.export.export(model, (x,), dynamic_shapes=dyn).module()


def _x86_quantizer(is_qat: bool = False):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    cfg = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    return X86InductorQuantizer().set_global(cfg)


def _batches(x: torch.Tensor, batch_size: int):
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


@torch.no_grad()
def pt2e_static_int8(
    model: nn.Module,
    calib_x: torch.Tensor,
    *,
    input_shape: tuple[int, ...] = (40,),
    example_batch: int = 64,
    calib_batch: int = 256,
    relu_modules: bool = True,
) -> nn.Module:
    """Static int8 PTQ with PT2E: export, ``prepare_pt2e``, calibrate on ``calib_x``, ``convert_pt2e``.

    ``model`` is not modified (it is deep-copied). A :class:`~labsupport.models.CNN1D` is first
    rewritten with ``nn.ReLU`` modules so the quantizer finds its Conv1d layers
    (``relu_modules=False`` shows what happens otherwise: only the Linear is quantized).
    Returns the converted graph module.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if len(calib_x) == 0:
        raise ValueError("calib_x is empty; static quantization needs calibration data")
    m = _pt2e_ready(model, relu_modules).eval()
    graph = _export_for_quant(m, tuple(input_shape), example_batch)
    prepared = prepare_pt2e(graph, _x86_quantizer())
    for xb in _batches(calib_x, calib_batch):
        prepared(xb)
    return _evaluable(convert_pt2e(prepared))


def _evaluable(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Let ``.eval()``/``.train()`` be called on an exported graph (it has no dropout/BatchNorm),
    so :func:`labsupport.train.evaluate` and the harness can treat it as any other model."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    return allow_exported_model_train_eval(graph)


class _ExportedTrainable(nn.Module):
    """Wraps an exported graph so that ``.train()``/``.eval()`` switch its QAT behaviour."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True):
        from torchao.quantization.pt2e import (
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def pt2e_qat_int8(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 100,
    seed: int = 0,
    input_shape: tuple[int, ...] = (40,),
    example_batch: int = 64,
    loss_fn: Callable | None = None,
) -> nn.Module:
    """Quantization-aware fine-tuning with PT2E (``prepare_qat_pt2e``), then ``convert_pt2e``.

    Fake-quantizes weights and activations during ``steps`` Adam steps of :func:`train` on
    ``(x, y)``, starting from a deep copy of ``model``. Returns the converted int8 graph module.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from labsupport.train import train

    m = _pt2e_ready(model, True).train()
    graph = _export_for_quant(m, tuple(input_shape), example_batch)
    wrapped = _ExportedTrainable(prepare_qat_pt2e(graph, _x86_quantizer(is_qat=True)))
    train(
        wrapped,
        x,
        y,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer="adam",
        generator=torch.Generator().manual_seed(seed),
        loss_fn=loss_fn,
    )
    wrapped.eval()
    return _evaluable(convert_pt2e(wrapped.graph))


def torchao_int8_linear(model: nn.Module, *, weight_only: bool = False) -> nn.Module:
    """torchao ``quantize_`` with int8 weights (and dynamic int8 activations unless ``weight_only``).

    Only ``nn.Linear`` layers change. Returns a quantized deep copy.
    """
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    m = copy.deepcopy(model).eval()
    cfg = Int8WeightOnlyConfig() if weight_only else Int8DynamicActivationInt8WeightConfig()
    quantize_(m, cfg)
    return m


def _intx_config(bits: int):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis

    dtypes = {8: torch.int8, 4: torch.int4, 2: torch.int2}
    if bits not in dtypes:
        raise ValueError(f"bits must be one of {sorted(dtypes)}, got {bits}")
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=dtypes[bits], weight_granularity=PerAxis(0)
    )


def torchao_ptq_linear(model: nn.Module, *, bits: int = 8) -> nn.Module:
    """PTQ of the Linear layers with the same config :func:`torchao_qat_linear` converts to."""
    from torchao.quantization import quantize_

    m = copy.deepcopy(model).eval()
    quantize_(m, _intx_config(bits))
    return m


def torchao_qat_linear(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bits: int = 8,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 100,
    seed: int = 0,
) -> nn.Module:
    """torchao QAT of the Linear layers: ``QATConfig(..., step="prepare")``, fine-tune, ``"convert"``.

    The base config is ``Int8DynamicActivationIntxWeightConfig`` (int8 per-token activations,
    ``bits``-bit per-channel weights); QATConfig of the int8-int8 config fails in torchao 0.18.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from labsupport.train import train

    m = copy.deepcopy(model).train()
    base = _intx_config(bits)
    quantize_(m, QATConfig(base, step="prepare"))
    train(
        m,
        x,
        y,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer="adam",
        generator=torch.Generator().manual_seed(seed),
    )
    m.eval()
    quantize_(m, QATConfig(base, step="convert"))
    return m


def eager_dynamic_int8(model: nn.Module) -> tuple[nn.Module, dict]:
    """``torch.ao.quantization.quantize_dynamic`` asked for Linear *and* Conv1d/Conv2d layers.

    Returns ``(quantized copy, report)``; ``report["quantized"]`` and ``report["left_fp32"]`` list
    the layers it did and did not convert (Conv layers land in the second list: dynamic
    quantization has no Conv kernels), ``report["deprecation"]`` the warning torch raised.
    """
    import torch.ao.quantization as tq

    m = copy.deepcopy(model).eval()
    wanted = {nn.Linear, nn.Conv1d, nn.Conv2d}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = tq.quantize_dynamic(m, wanted, dtype=torch.qint8)
    names = {n: type(mod) for n, mod in q.named_modules() if n}
    quantized = [
        n
        for n, t in names.items()
        if "quantized" in t.__module__ and "PackedParams" not in t.__name__
    ]
    left = [n for n, t in names.items() if t in wanted]
    deprecation = next(
        (str(w.message).splitlines()[0] for w in caught if "deprecat" in str(w.message)), ""
    )
    return q, {"quantized": quantized, "left_fp32": left, "deprecation": deprecation}


class ArrayCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over an array, in batches (a fresh pass per ``rewind``)."""

    def __init__(self, x: np.ndarray | torch.Tensor, input_name: str = "x", batch_size: int = 128):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"calibration data must be a non-empty (N, ...) array, got {x.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.input_name, self.batch_size = x, input_name, batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(
            {self.input_name: self.x[i : i + self.batch_size]}
            for i in range(0, len(self.x), self.batch_size)
        )


def _preprocess(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def ort_static_int8(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    calib_x: np.ndarray | torch.Tensor,
    *,
    symmetric: bool = False,
    per_channel: bool = True,
) -> Path:
    """Static int8 QDQ quantization of an ONNX file with ONNX Runtime, calibrated on ``calib_x``.

    Weights int8 per output channel; activations uint8 (asymmetric) or int8 symmetric with
    ``symmetric=True`` -- the form TensorRT's INT8 needs. Returns ``onnx_out``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(onnx_in), Path(onnx_out)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file at {src}")
    reader = ArrayCalibrationReader(calib_x)
    pre = _preprocess(src, dst.with_name(dst.stem + "_pre.onnx"))
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    quantize_static(
        str(pre),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )
    pre.unlink(missing_ok=True)
    return strip_onnx_metadata(dst)


def ort_dynamic_int8(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike) -> Path:
    """Dynamic int8 quantization with ONNX Runtime (weights int8, activations quantized per run)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(onnx_in), Path(onnx_out)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file at {src}")
    pre = _preprocess(src, dst.with_name(dst.stem + "_pre.onnx"))
    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
    pre.unlink(missing_ok=True)
    return strip_onnx_metadata(dst)
