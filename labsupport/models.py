"""Models used across the chapters.

The MNIST-1D trio follows the reference models of Greydanus & Kobak, "Scaling down deep learning with
MNIST-1D" (ICML 2024), whose paper reports about 32% (logistic regression), 68% (MLP) and 94% (CNN)
test accuracy on the default split:

* :func:`logistic` -- one linear layer (multinomial logistic regression).
* :class:`MLP` -- two hidden layers of 100 ReLU units.
* :class:`CNN1D` -- three stride-2 ``Conv1d`` layers with 25 channels and a linear read-out.

:class:`CNN2D` is a small LeNet-style network for the image sets (digits, MNIST, CIFAR-10) with an
optional GroupNorm.

:func:`save_model` / :func:`load_model` store a model as ``<stem>.safetensors`` (tensors, no pickle)
plus ``<stem>.json`` (the :func:`build_model` arguments that rebuild it, and anything else worth
keeping): chapter 04's checkpoints (``labsupport.edge.checkpoint``) and chapter 05's cloud replicas
load them, and loading never executes code from the files.

Every model is written for what later chapters do with it: no BatchNorm (its batch statistics break
per-sample gradients in Opacus, chapter 02; GroupNorm is offered instead), no in-place operations
after a layer (Opacus hooks), and plain ops that export to ONNX (chapter 04).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CNN1D",
    "CNN2D",
    "MLP",
    "build_model",
    "count_parameters",
    "load_model",
    "logistic",
    "save_model",
]


def logistic(in_features: int = 40, num_classes: int = 10) -> nn.Module:
    """Multinomial logistic regression: flatten, then one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class MLP(nn.Module):
    """``in -> hidden -> hidden -> classes`` with ReLU, as MNIST-1D's reference MLP (hidden=100)."""

    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN1D(nn.Module):
    """MNIST-1D's reference CNN: Conv1d(1, c, 5, s2, p1) then two Conv1d(c, c, 3, s2, p1), ReLU.

    With the default length 40 the feature map is 25 channels x 5 positions = 125 features.
    """

    def __init__(self, length: int = 40, num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        if out < 1:
            raise ValueError(f"length {length} is too short for three stride-2 convolutions")
        self.fc = nn.Linear(channels * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, -1)  # (N, L) or (N, 1, L) -> (N, 1, L)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


class CNN2D(nn.Module):
    """A small CNN for images: two 3x3 conv blocks (conv, [GroupNorm], ReLU, 2x2 max-pool) + MLP head.

    Works for any ``(C, H, W)`` input with H, W >= 4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR-10).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        group_norm: bool = False,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise ValueError(f"images must be at least 4x4 for two 2x2 poolings, got {h}x{w}")
        layers: list[nn.Module] = []
        for c_out in channels:
            layers.append(nn.Conv2d(c, c_out, kernel_size=3, padding=1))
            if group_norm:
                layers.append(nn.GroupNorm(min(8, c_out), c_out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    name: str,
    input_shape: Sequence[int] = (40,),
    num_classes: int = 10,
    *,
    seed: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a model by name: ``logistic``, ``mlp``, ``cnn`` (1-D, MNIST-1D) or ``cnn2d`` (images).

    ``input_shape`` is one sample's shape (``Dataset.input_shape``). With ``seed`` the initial
    weights are reproducible without touching the global RNG.
    """
    shape = tuple(int(s) for s in input_shape)
    numel = 1
    for s in shape:
        numel *= s
    builders = {
        "logistic": lambda: logistic(numel, num_classes, **kwargs),
        "mlp": lambda: MLP(numel, num_classes, **kwargs),
        "cnn": lambda: CNN1D(numel, num_classes, **kwargs),
        "cnn2d": lambda: CNN2D(shape, num_classes, **kwargs),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(builders)}")
    if name == "cnn" and len(shape) > 1 and shape[0] != 1:
        raise ValueError(
            f"the 1-D CNN takes (L,) or (1, L) inputs, got {shape}; use 'cnn2d' for images"
        )
    if name == "cnn2d" and len(shape) != 3:
        raise ValueError(f"'cnn2d' takes (C, H, W) inputs, got {shape}; use 'cnn' for MNIST-1D")
    if seed is None:
        return builders[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[name]()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------- checkpoints: safetensors + JSON

_REQUIRED_KEYS = ("model", "input_shape", "num_classes")


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_name: str,
    input_shape: tuple[int, ...] | list[int],
    num_classes: int,
    model_kwargs: dict | None = None,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``model`` as ``<stem>.safetensors`` + ``<stem>.json``; returns both paths.

    ``model_name``, ``input_shape``, ``num_classes`` and ``model_kwargs`` must rebuild the same
    architecture with :func:`build_model`; ``extra`` is stored verbatim (metrics, training
    parameters, the dataset's name).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "model": model_name,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "kwargs": dict(model_kwargs or {}),
        "num_parameters": count_parameters(model),
        **(extra or {}),
    }
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(tensors, str(weights))
    meta.write_text(json.dumps(config, indent=2, default=float) + "\n")
    return weights, meta


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_model` (``path``: the stem, .json or .safetensors).

    Returns ``(model in eval mode, config)``. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a JSON file without the keys needed to rebuild the model, or tensors that do
    not fit the architecture.
    """
    from safetensors.torch import load_file

    stem = _stem(path)
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (weights, meta):
        if not f.is_file():
            raise FileNotFoundError(
                f"checkpoint file {f} is missing; expected {weights} and {meta}"
            )
    try:
        config = json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{meta} must hold a JSON object, got {type(config).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{meta} lacks {missing}; expected keys {list(_REQUIRED_KEYS)} (+ 'kwargs')"
        )
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"'kwargs' in {meta} must be an object, got {type(kwargs).__name__}")
    model = build_model(
        config["model"], tuple(config["input_shape"]), int(config["num_classes"]), **kwargs
    )
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {weights} do not fit the model in {meta}: {exc}") from exc
    return model.eval(), config
