"""Centralized training and evaluation loops, reused by every chapter's clients.

Plain mini-batch training over in-memory tensors (no ``DataLoader``: for the small models and data of
these labs its per-batch overhead costs more than the model). Determinism comes from an explicit
``torch.Generator`` for the batch order, so a run can be repeated -- or resumed -- exactly.

* :func:`train` -- ``epochs`` or ``steps`` of SGD/Adam on ``(x, y)``; ``batch_size=None`` is full-batch
  gradient descent (FedSGD's client step, McMahan et al. 2017). An optional ``penalty(model)`` is added
  to the loss (FedProx's proximal term in chapter 03).
* :func:`evaluate` -- loss and accuracy.
* :func:`fit` -- the centralized baseline: train with periodic evaluation and a tqdm bar.

Use one torch thread for these tiny models on small CPUs (:func:`labsupport.device.set_threads`);
``python -m labsupport.bench threads`` measures why.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "TrainResult",
    "batch_indices",
    "evaluate",
    "fit",
    "make_optimizer",
    "seed_everything",
    "train",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (the lab code itself uses explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def batch_indices(
    n: int, batch_size: int | None, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches; ``batch_size=None`` yields one full batch (unshuffled)."""
    if batch_size is None or batch_size >= n:
        yield torch.arange(n)
        return
    perm = torch.randperm(n, generator=generator)
    yield from perm.split(batch_size)


def make_optimizer(
    name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` or ``adam``, by name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")


@dataclass
class TrainResult:
    """What a call of :func:`train` did: the number of steps and samples and the mean loss."""

    steps: int
    samples: int
    loss: float
    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = 32,
    lr: float = 0.05,
    optimizer: str | torch.optim.Optimizer = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    record_losses: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` for ``epochs`` passes or ``steps`` mini-batches.

    The batch order comes from ``generator`` (pass a seeded one for repeatable runs).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps=")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    if batch_size is not None and batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer or None (full batch), got {batch_size}"
        )
    opt = (
        optimizer
        if isinstance(optimizer, torch.optim.Optimizer)
        else make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    )
    model.train()
    total_samples, done = 0, 0
    batch_losses: list[torch.Tensor] = []  # summed once at the end: no Python float per step
    batch_sizes: list[int] = []
    epoch = 0
    while epochs is None or epoch < epochs:
        for idx in batch_indices(len(x), batch_size, generator):
            if steps is not None and done >= steps:
                break
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batch_losses.append(loss.detach())
            batch_sizes.append(len(idx))
            total_samples += len(idx)
            done += 1
        epoch += 1
        if steps is not None and done >= steps:
            break
    per_batch = torch.stack(batch_losses).double() if batch_losses else torch.zeros(0)
    total_loss = float((per_batch * torch.tensor(batch_sizes, dtype=torch.float64)).sum())
    losses = per_batch.tolist() if record_losses else []
    return TrainResult(
        steps=done, samples=total_samples, loss=total_loss / max(total_samples, 1), losses=losses
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` (fraction in [0, 1]) of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}


def fit(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    steps: int = 6000,
    batch_size: int = 100,
    lr: float = 1e-2,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    eval_every: int = 250,
    seed: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, list[float]]:
    """Centralized training with evaluation every ``eval_every`` steps.

    The defaults are the MNIST-1D paper's recipe (Adam, lr 1e-2, batch 100, 6,000 steps). Returns a
    history: ``step``, ``train_loss`` (mean since the last evaluation), ``test_loss``, ``test_accuracy``.
    """
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {
        "step": [],
        "train_loss": [],
        "test_loss": [],
        "test_accuracy": [],
    }
    done = 0
    bar = tqdm(total=steps, desc=desc or type(model).__name__, disable=not progress)
    while done < steps:
        chunk = min(eval_every, steps - done)
        result = train(
            model,
            x_train,
            y_train,
            steps=chunk,
            batch_size=batch_size,
            optimizer=opt,
            generator=gen,
        )
        done += result.steps
        metrics = evaluate(model, x_test, y_test)
        history["step"].append(done)
        history["train_loss"].append(result.loss)
        history["test_loss"].append(metrics["loss"])
        history["test_accuracy"].append(metrics["accuracy"])
        bar.update(result.steps)
        bar.set_postfix(test_acc=f"{metrics['accuracy']:.3f}")
    bar.close()
    return history
