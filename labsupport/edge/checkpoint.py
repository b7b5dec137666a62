"""Checkpoints without pickle, the validation split, and the cached MNIST-1D teacher (chapter 04).

* :func:`save_checkpoint` / :func:`load_checkpoint` -- a model as ``<stem>.safetensors`` (tensors,
  no pickle) plus ``<stem>.json`` (how to rebuild it with :func:`labsupport.models.build_model`, and
  anything else worth keeping). Loading never executes code from the files. They are
  :func:`labsupport.models.save_model` / :func:`~labsupport.models.load_model` under chapter 04's
  names (chapter 05's cloud replicas load the same files).
* :func:`split_validation` -- a seeded, class-agnostic validation split carved from the training
  data: every choice in chapter 04 (fine-tuning steps, temperature, calibration) is made on it.
* :func:`mnist1d_splits` -- MNIST-1D's train / validation / test tensors.
* :func:`train_teacher` -- the wide CNN1D (Greydanus & Kobak 2024's CNN with 128 channels instead
  of 25) that every optimization in notebook 04 starts from; trained once with the paper's recipe
  (Adam, lr 1e-2, batch 100) and cached under ``<data dir>/models`` keyed by its training parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from labsupport.data import data_dir, load_dataset
from labsupport.models import build_model, load_model, save_model
from labsupport.train import evaluate, train

__all__ = [
    "Splits",
    "load_checkpoint",
    "mnist1d_splits",
    "save_checkpoint",
    "split_validation",
    "train_teacher",
]

# The checkpoint format is shared with chapter 05: one implementation, in labsupport.models.
save_checkpoint = save_model
load_checkpoint = load_model


def split_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: a seeded random ``fraction`` of ``(x, y)`` held out."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_val = round(len(x) * fraction)
    if n_val < 1 or n_val >= len(x):
        raise ValueError(f"a {fraction:g} split of {len(x)} samples leaves an empty side")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]


@dataclass(frozen=True)
class Splits:
    """MNIST-1D as train (minus validation) / validation / test tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def mnist1d_splits(val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """MNIST-1D's default 4,000/1,000 split with ``val_fraction`` of the 4,000 held out."""
    ds = load_dataset("mnist1d")
    xt, yt, xv, yv = split_validation(ds.x_train, ds.y_train, val_fraction, seed)
    return Splits(xt, yt, xv, yv, ds.x_test, ds.y_test)


def train_teacher(
    *,
    channels: int = 128,
    steps: int = 4000,
    lr: float = 1e-2,
    batch_size: int = 100,
    seed: int = 0,
    val_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    refresh: bool = False,
) -> tuple[nn.Module, dict]:
    """The wide CNN1D teacher on MNIST-1D, trained once and cached; returns ``(model, config)``.

    The cache key hashes every training parameter, so changing one trains a new teacher.
    ``config`` holds the parameters and the validation and test accuracy. Training runs on
    ``device`` (default :func:`labsupport.device.get_device`, which honours ``LAB_DEVICE``); the
    returned model is on the CPU, in eval mode.
    """
    from labsupport.device import get_device

    if channels < 1 or steps < 1:
        raise ValueError(f"channels and steps must be >= 1, got {channels} and {steps}")
    params = {
        "dataset": "mnist1d",
        "channels": channels,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else data_dir() / "models"
    stem = folder / f"teacher_cnn{channels}_{key}"
    if not refresh and stem.with_suffix(".json").is_file():
        try:
            return load_checkpoint(stem)
        except (ValueError, FileNotFoundError):
            pass  # a damaged cache entry: train again and overwrite it
    s = mnist1d_splits(val_fraction, seed)
    dev = torch.device(device) if device is not None else get_device()
    model = build_model("cnn", (40,), 10, seed=seed, channels=channels).to(dev)
    train(
        model,
        s.x_train,
        s.y_train,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer="adam",
        generator=torch.Generator().manual_seed(seed),
        device=dev,
    )
    model = model.cpu().eval()
    extra = {
        "training": params,
        "val_accuracy": evaluate(model, s.x_val, s.y_val)["accuracy"],
        "test_accuracy": evaluate(model, s.x_test, s.y_test)["accuracy"],
    }
    save_checkpoint(
        model,
        stem,
        model_name="cnn",
        input_shape=(40,),
        num_classes=10,
        model_kwargs={"channels": channels},
        extra=extra,
    )
    return load_checkpoint(stem)
