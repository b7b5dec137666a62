"""Chapter 04: edge deployment and optimization -- export, quantization, pruning, distillation,
TensorRT, one benchmark harness and a deployment recipe.

Modules: :mod:`~labsupport.edge.checkpoint` (safetensors+JSON checkpoints, the cached teacher),
:mod:`~labsupport.edge.export` (ONNX + ONNX Runtime), :mod:`~labsupport.edge.quantize` (PTQ, QAT),
:mod:`~labsupport.edge.prune`, :mod:`~labsupport.edge.distill` (Hinton et al. 2015),
:mod:`~labsupport.edge.tensorrt`, :mod:`~labsupport.edge.harness` and :mod:`~labsupport.edge.deploy`
(``python -m labsupport.edge.deploy CHECKPOINT OUT_DIR``). ``labsupport.edge.distill`` is
the module (its function is ``labsupport.edge.distill.distill``). Heavy imports (torchao, torch_pruning,
TensorRT) happen inside the functions that need them.
"""

from labsupport.edge.checkpoint import (
    load_checkpoint,
    mnist1d_splits,
    save_checkpoint,
    split_validation,
    train_teacher,
)
from labsupport.edge.distill import distill_loss_fn, distillation_loss
from labsupport.edge.export import OrtModel, export_onnx, onnx_size_bytes, parity, select_providers

__all__ = [
    "OrtModel",
    "distill_loss_fn",
    "distillation_loss",
    "export_onnx",
    "load_checkpoint",
    "mnist1d_splits",
    "onnx_size_bytes",
    "parity",
    "save_checkpoint",
    "select_providers",
    "split_validation",
    "train_teacher",
]
