"""The edge and cloud models of the hybrid system and split inference (chapter 05, sections 1 and 4).

* :class:`Classifier` -- what the router needs from a model: a callable from a batch (numpy or torch,
  ``(N, 40)``) to logits ``(N, C)`` as a float32 tensor. :class:`TorchClassifier` wraps an
  ``nn.Module`` (``eval()`` and ``inference_mode``); :class:`OnnxClassifier` wraps chapter 04's
  :class:`labsupport.edge.export.OrtModel` (explicit providers, one thread, the provider that really
  ran), so an INT8 ONNX file plugs in unchanged.
* :func:`train_pair` -- the edge and cloud models on MNIST-1D (20,000 generated signals), on the
  training split minus a validation split that every later choice (temperature, threshold) uses.
  The **cloud** is a 256-channel ``CNN1D`` (about 400,000 parameters) trained with the paper's recipe
  (Adam, lr 1e-2, batch 100). The **edge** is chapter 04's pipeline applied to it
  (:func:`distilled_edge`): a 12-channel student distilled from the cloud (Hinton et al. 2015,
  :func:`labsupport.edge.distill.distill`), exported to ONNX
  (:func:`labsupport.edge.export.export_onnx`) and quantized to static INT8 QDQ with ONNX Runtime
  (:func:`labsupport.edge.quantize.ort_static_int8`, calibrated on training inputs); it runs through
  ONNX Runtime. ``edge=("cnn", {...})`` trains a plain PyTorch edge instead (chapter 06's exercise).
  Everything is trained once and cached under the data directory as
  :func:`labsupport.models.save_model` checkpoints (safetensors + JSON, no pickle), keyed by every
  training parameter. Seen here: cloud 95.7%, INT8 student 92.6% test accuracy (3.1 points apart;
  chapter 04's 40-channel student is 0.1 points from this cloud: nothing left to route).
* Split inference (Kang et al., "Neurosurgeon", ASPLOS 2017): :func:`cnn_head` runs the first
  ``layer`` convolutions of a ``CNN1D`` on the device, :func:`cnn_tail` the rest in the cloud;
  :func:`feature_shape` says what crosses the wire. :func:`reconstruction_r2` measures what the
  features expose: how much of the raw input a ridge regression recovers from them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from labsupport.data import data_dir, load_dataset
from labsupport.models import CNN1D, build_model, count_parameters, load_model, save_model
from labsupport.train import evaluate, fit

__all__ = [
    "CLOUD",
    "EDGE",
    "Classifier",
    "ModelPair",
    "OnnxClassifier",
    "TorchClassifier",
    "cnn_head",
    "cnn_tail",
    "distilled_edge",
    "feature_shape",
    "reconstruction_r2",
    "train_pair",
    "validation_split",
]


class Classifier(Protocol):
    """A batch in, logits out: ``(N, ...)`` numpy array or tensor -> ``(N, C)`` float32 tensor."""

    def __call__(self, x: Any) -> torch.Tensor: ...


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor batch, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch (N, ...), got shape {tuple(x.shape)}")
    return x.float()


class TorchClassifier:
    """A PyTorch model as a :class:`Classifier`: evaluated in ``eval()`` mode without autograd."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, x: Any) -> torch.Tensor:
        return self.model(_to_tensor(x))


class OnnxClassifier:
    """An ONNX file run by ONNX Runtime as a :class:`Classifier` (chapter 04's
    :class:`~labsupport.edge.export.OrtModel`: providers filtered against what this machine has,
    ``threads`` intra-op threads, ``provider`` the one that really runs).

    The file must have one input (a batch of signals) and logits as its first output.
    :meth:`logits` returns them as numpy without the tensor conversion (the router's hot path).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 1,
    ) -> None:
        from labsupport.edge.export import OrtModel

        if isinstance(providers, str):
            raise TypeError("providers must be a sequence of provider names, not one string")
        self.runner = OrtModel(path, providers=providers, threads=threads)
        self.path = self.runner.path

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (e.g. ``CPUExecutionProvider``)."""
        return self.runner.provider

    def logits(self, x: Any) -> np.ndarray:
        """``(N, C)`` float32 logits as numpy for a batch ``(N, ...)`` (numpy or tensor)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"expected a numpy array or torch tensor batch, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"expected a batch (N, ...), got shape {x.shape}")
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        return self.runner.session.run(None, {self.runner.input_name: x})[0]

    def __call__(self, x: Any) -> torch.Tensor:
        return torch.from_numpy(self.logits(x))


# --------------------------------------------------------------------------------------- training


def validation_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(train_idx, val_idx)``: a seeded random ``fraction`` of ``range(n)`` held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * fraction))
    return perm[n_val:], perm[:n_val]


@dataclass
class ModelPair:
    """The edge and cloud models, the data splits, and where their files are.

    ``edge`` is what the device runs (an :class:`OnnxClassifier` on the INT8 file for the default
    distilled student, else the PyTorch module); ``edge_model`` is the PyTorch edge (the fp32
    student before export); ``edge_onnx`` the INT8 file (``None`` for a PyTorch edge).
    """

    edge: Any
    cloud: nn.Module
    edge_path: Path
    cloud_path: Path
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    metrics: dict
    edge_model: nn.Module | None = None
    edge_onnx: Path | None = None


EDGE = ("student", {"channels": 12})
CLOUD = ("cnn", {"channels": 256})
_STUDENT_DEFAULTS = {"temperature": 4.0, "alpha": 0.9, "steps": 3000, "int8": True}


def _key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _cached(stem: Path) -> nn.Module | None:
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        try:
            return load_model(stem)[0]
        except ValueError:  # an old or damaged entry: train again and overwrite it
            return None
    return None


def _save(model: nn.Module, stem: Path, arch: str, kwargs: dict, extra: dict) -> None:
    save_model(
        model,
        stem,
        model_name=arch,
        input_shape=(40,),
        num_classes=10,
        model_kwargs=kwargs,
        extra=extra,
    )


def _train_one(
    arch: str,
    kwargs: dict,
    data: tuple[torch.Tensor, ...],
    steps: int,
    seed: int,
    folder: Path,
    meta: dict,
) -> tuple[nn.Module, Path]:
    x_tr, y_tr, x_val, y_val = data
    stem = (
        folder
        / f"{arch}_{_key({'arch': arch, 'kwargs': kwargs, 'steps': steps, 'seed': seed, **meta})}"
    )
    model = _cached(stem)
    if model is not None:
        return model, stem
    model = build_model(arch, seed=seed, **kwargs)
    fit(model, x_tr, y_tr, x_val, y_val, steps=steps, eval_every=steps, seed=seed, progress=False)
    val = evaluate(model, x_val, y_val)
    _save(
        model,
        stem,
        arch,
        kwargs,
        {"steps": steps, "seed": seed, "val_accuracy": val["accuracy"], **meta},
    )
    return model.eval(), stem


def distilled_edge(
    cloud: nn.Module,
    cloud_path: str | os.PathLike,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    channels: int = 12,
    temperature: float = 4.0,
    alpha: float = 0.9,
    steps: int = 3000,
    seed: int = 0,
    int8: bool = True,
    folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, Path, Path | None]:
    """Chapter 04's edge pipeline on the cloud model: distill a ``channels``-channel ``CNN1D``
    student from ``cloud`` on ``(x_train, y_train)`` (Hinton et al.'s loss at ``temperature``,
    ``alpha``; Adam, lr 1e-2, batch 100, ``steps`` steps), export it to ONNX and, with ``int8``,
    quantize it to static INT8 QDQ calibrated on 512 training inputs.

    Cached next to the cloud checkpoint, keyed by the cloud's file name and every parameter.
    Returns ``(fp32 student, checkpoint stem, ONNX path)``: the INT8 file with ``int8``, else fp32.
    """
    from labsupport.edge.distill import distill
    from labsupport.edge.export import export_onnx
    from labsupport.edge.quantize import ort_static_int8

    if channels < 1 or steps < 1:
        raise ValueError(f"channels and steps must be >= 1, got {channels} and {steps}")
    where = Path(folder) if folder is not None else Path(cloud_path).parent
    params = {
        "teacher": Path(cloud_path).with_suffix("").name,
        "channels": channels,
        "temperature": temperature,
        "alpha": alpha,
        "steps": steps,
        "seed": seed,
        "num_train": len(x_train),
    }
    stem = where / f"student{channels}_{_key(params)}"
    onnx_path = stem.with_suffix(".int8.onnx" if int8 else ".onnx")
    student = _cached(stem)
    if student is None:
        student = build_model("cnn", seed=seed, channels=channels)
        with torch.inference_mode(False), torch.enable_grad():  # callers may sit in inference mode
            distill(
                student,
                cloud.eval(),
                x_train,
                y_train,
                temperature=temperature,
                alpha=alpha,
                steps=steps,
                seed=seed,
            )
        _save(student, stem, "cnn", {"channels": channels}, {"distilled": params})
    if not onnx_path.is_file():
        fp32 = export_onnx(student, stem.with_suffix(".fp32.onnx"))
        if int8:
            ort_static_int8(fp32, onnx_path, x_train[:512])
            fp32.unlink(missing_ok=True)
        else:
            fp32.rename(onnx_path)
    return student.eval(), stem, onnx_path


def _accuracy(clf, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return int((clf(x).argmax(1) == y).sum()) / len(y)  # exact: no float32 mean


def train_pair(
    *,
    steps: int = 4000,
    seed: int = 0,
    num_samples: int = 20000,
    val_fraction: float = 0.2,
    edge: tuple[str, dict] = EDGE,
    cloud: tuple[str, dict] = CLOUD,
    folder: str | os.PathLike | None = None,
) -> ModelPair:
    """Train (or load from the cache) the edge and cloud models on MNIST-1D's training split minus a
    validation split; returns both with the splits and their validation/test accuracy.

    ``edge=("student", {"channels": 12, ...})`` (the default) is :func:`distilled_edge` of the cloud
    (keys ``temperature``, ``alpha``, ``steps`` (default 3000), ``int8``); any other
    ``(arch, kwargs)`` trains that :func:`labsupport.models.build_model` architecture for ``steps``.
    """
    kind, edge_kwargs = edge
    ds = load_dataset("mnist1d", num_samples=num_samples)
    tr, va = validation_split(len(ds.y_train), val_fraction, seed)
    data = (ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va])
    where = Path(folder) if folder is not None else data_dir() / "hybrid"
    meta = {"num_samples": num_samples, "val_fraction": val_fraction, "dataset": "mnist1d"}
    cloud_model, cloud_path = _train_one(*cloud, data, steps, seed, where, meta)
    edge_onnx = None
    if kind == "student":
        unknown = set(edge_kwargs) - {"channels", *_STUDENT_DEFAULTS}
        if unknown:
            raise ValueError(
                f"unknown student options {sorted(unknown)}; expected channels, "
                f"{', '.join(_STUDENT_DEFAULTS)}"
            )
        opts = {**_STUDENT_DEFAULTS, "channels": 12, **edge_kwargs}
        edge_model, edge_path, edge_onnx = distilled_edge(
            cloud_model, cloud_path, data[0], data[1], seed=seed, folder=where, **opts
        )
        edge_clf: Any = OnnxClassifier(edge_onnx)
    else:
        edge_model, edge_path = _train_one(kind, edge_kwargs, data, steps, seed, where, meta)
        edge_clf = edge_model
    metrics = {}
    for name, m in (("edge", edge_clf), ("cloud", cloud_model)):
        metrics[f"{name}_val_accuracy"] = _accuracy(m, data[2], data[3])
        metrics[f"{name}_test_accuracy"] = _accuracy(m, ds.x_test, ds.y_test)
    metrics["edge_parameters"] = count_parameters(edge_model)
    metrics["cloud_parameters"] = count_parameters(cloud_model)
    if edge_onnx is not None:
        metrics["edge_fp32_test_accuracy"] = _accuracy(edge_model, ds.x_test, ds.y_test)
        metrics["edge_onnx_bytes"] = edge_onnx.stat().st_size
    return ModelPair(
        edge_clf,
        cloud_model.eval(),
        edge_path,
        cloud_path,
        *data[:2],
        data[2],
        data[3],
        ds.x_test,
        ds.y_test,
        metrics,
        edge_model=edge_model.eval(),
        edge_onnx=edge_onnx,
    )


# ------------------------------------------------------------------------------- split inference


def _check_cnn(model: nn.Module, layer: int) -> None:
    if not isinstance(model, CNN1D):
        raise TypeError(f"split inference is written for CNN1D, got {type(model).__name__}")
    if layer not in (0, 1, 2, 3):
        raise ValueError(f"layer must be 0 (raw input), 1, 2 or 3 convolutions, got {layer!r}")


def _convs(model: CNN1D) -> list[nn.Conv1d]:
    return [model.conv1, model.conv2, model.conv3]


def feature_shape(model: CNN1D, layer: int, length: int = 40) -> tuple[int, ...]:
    """Shape of one sample's features after ``layer`` convolutions (``(length,)`` for layer 0)."""
    _check_cnn(model, layer)
    if layer == 0:
        return (length,)
    out = length
    for conv in _convs(model)[:layer]:
        out = (out + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    return (_convs(model)[layer - 1].out_channels, out)


@torch.inference_mode()
def cnn_head(model: CNN1D, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The device's part: the first ``layer`` convolutions (+ ReLU) of ``model`` on ``x``."""
    _check_cnn(model, layer)
    h = x.reshape(x.shape[0], -1)
    if layer == 0:
        return h
    h = h.reshape(h.shape[0], 1, -1)
    for conv in _convs(model)[:layer]:
        h = torch.relu(conv(h))
    return h


@torch.inference_mode()
def cnn_tail(model: CNN1D, h: torch.Tensor, layer: int) -> torch.Tensor:
    """The cloud's part: the rest of ``model`` from the features after ``layer`` convolutions."""
    _check_cnn(model, layer)
    if layer == 0:
        return model(h)
    for conv in _convs(model)[layer:]:
        h = torch.relu(conv(h))
    return model.fc(torch.flatten(h, 1))


def reconstruction_r2(
    feats_fit: torch.Tensor,
    x_fit: torch.Tensor,
    feats_eval: torch.Tensor,
    x_eval: torch.Tensor,
    ridge: float = 1e-2,
) -> float:
    """R² of a ridge regression from features back to the raw input (fit on one split, scored on
    another): 1 means the features give the input away, 0 means they hide it from a linear attacker.

    A *linear* attacker is a lower bound on what the features expose (Mahendran & Vedaldi 2015 invert
    CNN features far better with learned decoders)."""
    f1 = feats_fit.reshape(len(feats_fit), -1).double().numpy()
    f2 = feats_eval.reshape(len(feats_eval), -1).double().numpy()
    y1 = x_fit.reshape(len(x_fit), -1).double().numpy()
    y2 = x_eval.reshape(len(x_eval), -1).double().numpy()
    mu_f, mu_y = f1.mean(0), y1.mean(0)
    a, b = f1 - mu_f, y1 - mu_y
    w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ b)
    pred = (f2 - mu_f) @ w + mu_y
    ss_res = ((y2 - pred) ** 2).sum()
    ss_tot = ((y2 - y2.mean(0)) ** 2).sum()
    return float(1.0 - ss_res / ss_tot)
