"""The edge and cloud models of the hybrid system, their checkpoints, and split inference
(chapter 05, sections 1 and 4).

* :class:`Classifier` -- what the router needs from a model: a callable from a batch (numpy or torch,
  ``(N, 40)``) to logits ``(N, C)`` as a float32 tensor. :class:`TorchClassifier` wraps an
  ``nn.Module`` (``eval()`` and ``inference_mode``); :class:`OnnxClassifier` wraps an ONNX Runtime
  session, so chapter 04's INT8 student plugs in unchanged.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- weights as safetensors plus a JSON config naming
  the architecture (``labsupport.models.build_model`` arguments): loading executes no pickle.
* :func:`train_pair` -- the edge model (an 8-channel ``CNN1D``, about 900 parameters) and the cloud
  model (a 256-channel ``CNN1D``, about 400,000) trained on MNIST-1D (20,000 generated signals) with
  the paper's recipe (Adam, lr 1e-2, batch 100), on the training split minus a validation split that
  every later choice (temperature, threshold) uses. Trained once and cached under the data
  directory, keyed by every training parameter. Seen here: edge 86.6%, cloud 95.7% test accuracy.
* Split inference (Kang et al., "Neurosurgeon", ASPLOS 2017): :func:`cnn_head` runs the first
  ``layer`` convolutions of a ``CNN1D`` on the device, :func:`cnn_tail` the rest in the cloud;
  :func:`feature_shape` says what crosses the wire. :func:`reconstruction_r2` measures what the
  features expose: how much of the raw input a ridge regression recovers from them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from labsupport.data import data_dir, load_dataset
from labsupport.models import CNN1D, build_model
from labsupport.train import evaluate, fit

__all__ = [
    "Classifier",
    "ModelPair",
    "OnnxClassifier",
    "TorchClassifier",
    "cnn_head",
    "cnn_tail",
    "feature_shape",
    "load_checkpoint",
    "reconstruction_r2",
    "save_checkpoint",
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
    """An ONNX Runtime session as a :class:`Classifier` (CPU provider unless ``providers`` is given).

    The ONNX file must have one input (a batch of signals) and logits as its first output.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise ValueError(f"none of the providers {wanted} is available; have {available}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=chosen)
        self._input = self.session.get_inputs()[0].name

    def __call__(self, x: Any) -> torch.Tensor:
        arr = _to_tensor(x).numpy()
        return torch.from_numpy(self.session.run(None, {self._input: arr})[0])


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, arch: str, kwargs: dict, **extra: Any
) -> Path:
    """Write ``path.safetensors`` (weights) and ``path.json`` (architecture + ``extra``).

    ``arch`` and ``kwargs`` are :func:`labsupport.models.build_model`'s arguments. Returns the
    safetensors path.
    """
    from safetensors.torch import save_file

    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(weights))
    config = {"arch": arch, "kwargs": kwargs, **extra}
    stem.with_suffix(".json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return weights


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild a model from ``path.json`` and load ``path.safetensors`` (no pickle); returns
    ``(model in eval mode, config)``."""
    from safetensors.torch import load_file

    stem = Path(path).with_suffix("")
    cfg_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (cfg_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"checkpoint file {p} is missing (need .json and .safetensors)")
    config = json.loads(cfg_path.read_text())
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError(f"{cfg_path} must be a JSON object with an 'arch' key, got {config!r}")
    model = build_model(config["arch"], **config.get("kwargs", {}))
    state = load_file(str(weights))
    model.load_state_dict(state, strict=True)
    return model.eval(), config


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
    """The edge and cloud models, the data splits, and where their checkpoints are."""

    edge: nn.Module
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


EDGE = ("cnn", {"channels": 8})
CLOUD = ("cnn", {"channels": 256})


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
    key = json.dumps({"arch": arch, "kwargs": kwargs, "steps": steps, "seed": seed, **meta})
    stem = folder / f"{arch}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if stem.with_suffix(".json").exists() and stem.with_suffix(".safetensors").exists():
        model, _ = load_checkpoint(stem)
        return model, stem
    model = build_model(arch, seed=seed, **kwargs)
    fit(model, x_tr, y_tr, x_val, y_val, steps=steps, eval_every=steps, seed=seed, progress=False)
    val = evaluate(model, x_val, y_val)
    save_checkpoint(
        model, stem, arch, kwargs, steps=steps, seed=seed, val_accuracy=val["accuracy"], **meta
    )
    return model.eval(), stem


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
    validation split; returns both with the splits and their validation/test accuracy."""
    ds = load_dataset("mnist1d", num_samples=num_samples)
    tr, va = validation_split(len(ds.y_train), val_fraction, seed)
    data = (ds.x_train[tr], ds.y_train[tr], ds.x_train[va], ds.y_train[va])
    where = Path(folder) if folder is not None else data_dir() / "hybrid"
    meta = {"num_samples": num_samples, "val_fraction": val_fraction, "dataset": "mnist1d"}
    edge_model, edge_path = _train_one(*edge, data, steps, seed, where, meta)
    cloud_model, cloud_path = _train_one(*cloud, data, steps, seed, where, meta)
    metrics = {}
    for name, m in (("edge", edge_model), ("cloud", cloud_model)):
        metrics[f"{name}_val_accuracy"] = evaluate(m, data[2], data[3])["accuracy"]
        metrics[f"{name}_test_accuracy"] = evaluate(m, ds.x_test, ds.y_test)["accuracy"]
    return ModelPair(
        edge_model.eval(),
        cloud_model.eval(),
        edge_path,
        cloud_path,
        *data[:2],
        data[2],
        data[3],
        ds.x_test,
        ds.y_test,
        metrics,
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
