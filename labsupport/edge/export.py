"""ONNX export, ONNX Runtime sessions with explicit providers, and the parity check (chapter 04).

* :func:`export_onnx` -- ``torch.onnx.export`` with the current (dynamo, ``torch.export``-based)
  exporter, a dynamic batch dimension, and all weights in one file (``external_data=False``);
* :func:`onnx_size_bytes` -- the model file *plus* any external-data files it points to (the dynamo
  exporter writes ``model.onnx.data`` by default: a size that ignores it is wrong);
* :func:`select_providers` / :class:`OrtModel` -- ONNX Runtime asked for providers *filtered against*
  ``onnxruntime.get_available_providers()`` (an unavailable one only warns and silently runs on the
  CPU), and reporting which provider actually runs (``session.get_providers()``);
* :func:`parity` -- the numerical check against PyTorch: max absolute logit difference and argmax
  agreement on the same inputs.

Notebook 04 exports the teacher with these, and :mod:`labsupport.edge.deploy` uses them.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = [
    "DEFAULT_PROVIDERS",
    "OrtModel",
    "export_onnx",
    "onnx_size_bytes",
    "parity",
    "select_providers",
    "strip_onnx_metadata",
]

DEFAULT_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] = (40,),
    example_batch: int = 2,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (on the CPU) to ``path`` with input ``x`` and output ``logits``.

    The batch dimension is dynamic unless ``dynamic_batch=False``; ``example_batch`` must be >= 2
    for a dynamic batch (``torch.export`` specializes a dimension of size 1 to a constant). All
    weights are stored inside the one file. Returns the path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dynamic_batch and example_batch < 2:
        raise ValueError(
            f"example_batch must be >= 2 for a dynamic batch (got {example_batch}): "
            "torch.export turns a size-1 dimension into a constant"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.randn(example_batch, *input_shape)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=dynamic,
            verbose=False,
        )
    model.train(was_training)
    return strip_onnx_metadata(path)


def strip_onnx_metadata(path: str | os.PathLike) -> Path:
    """Drop what only debugging needs from an ONNX file, in place: per-node metadata (the dynamo
    exporter stores source locations there), doc strings and inferred ``value_info`` shapes.

    The graph, its weights and its outputs are unchanged; a runtime infers shapes again on load.
    """
    path = Path(path)
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(proto, str(path))
    return path


def onnx_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the ONNX file and every external-data file it references."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    total = path.stat().st_size
    for loc in locations:
        f = path.parent / loc
        if not f.is_file():
            raise FileNotFoundError(f"{path} references external data {loc!r}, missing at {f}")
        total += f.stat().st_size
    return total


def select_providers(
    wanted: Sequence[str] = DEFAULT_PROVIDERS,
) -> tuple[list[str], list[str]]:
    """``(usable, dropped)``: ``wanted`` in order, split by ``onnxruntime.get_available_providers()``.

    The CPU provider is appended when nothing else is usable, so a session can always be made.
    """
    if isinstance(wanted, str):
        raise TypeError("wanted must be a sequence of provider names, not one string")
    available = set(ort.get_available_providers())
    usable = [p for p in wanted if p in available]
    dropped = [p for p in wanted if p not in available]
    if not usable:
        usable = ["CPUExecutionProvider"]
    return usable, dropped


class OrtModel:
    """An ONNX Runtime session on ``path`` with explicit providers and a fixed thread count.

    ``requested`` are the providers asked for, ``dropped`` those this machine lacks, and
    ``providers`` those the session really uses (``session.get_providers()``). Calling the object
    with a float32 array (or tensor) of shape ``(N, *input_shape)`` returns the logits as numpy.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        threads: int = 1,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}")
        self.requested = list(providers)
        usable, self.dropped = select_providers(providers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.threads = threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=usable)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name

    @property
    def provider(self) -> str:
        """The provider that runs first (the one doing the work for every supported node)."""
        return self.providers[0]

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


@torch.no_grad()
def parity(model: nn.Module, runner, x: torch.Tensor) -> dict[str, float]:
    """Compare ``runner(x)`` (numpy logits) with ``model(x)``: max abs diff and argmax agreement."""
    if len(x) == 0:
        raise ValueError("parity needs at least one input")
    was_training = model.training
    model.eval()
    ref = model(x).detach().cpu().numpy()
    model.train(was_training)
    got = np.asarray(runner(x))
    if got.shape != ref.shape:
        raise ValueError(f"runner returned shape {got.shape}; PyTorch returned {ref.shape}")
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
    }
