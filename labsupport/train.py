"""Centralized training and evaluation loops, reused by every chapter's clients.

Plain mini-batch training over in-memory tensors (no ``DataLoader``: for the small models and data of
these labs its per-batch overhead costs more than the model). Determinism comes from an explicit
``torch.Generator`` for the batch order, so a run can be repeated -- or resumed -- exactly.

* :func:`train` -- ``epochs`` or ``steps`` of SGD/Adam on ``(x, y)``; ``batch_size=None`` is full-batch
  gradient descent (FedSGD's client step, McMahan et al. 2017). Hooks for the chapters that change
  the local step, each ``None`` by default:

  - ``loss_fn(model, xb, yb) -> loss`` replaces cross-entropy (distillation, chapter 04);
  - ``penalty(model) -> tensor`` is added to the loss (FedProx's proximal term, chapter 03);
  - ``grad_hook(model)`` runs after ``backward()`` and before the optimizer step, and may rewrite
    the ``.grad`` of every parameter (SCAFFOLD's correction, chapter 03; per-sample clipping and
    noise, chapter 02);
  - ``batch_sampler(n, generator=...) -> iterable of index tensors`` is one epoch of batches (Poisson
    sampling for DP-SGD, :func:`poisson_batches`); the default is :func:`batch_indices`;
  - ``device``: the data is moved there batch by batch (the model must already be there,
    :func:`labsupport.device.get_device` honours ``LAB_DEVICE``).
* :func:`evaluate` -- loss and accuracy.
* :func:`fit` -- the centralized baseline: train with periodic evaluation and a tqdm bar.

Use one torch thread for these tiny models on small CPUs (:func:`labsupport.device.set_threads`);
``python -m labsupport.bench threads`` measures why.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "BatchSampler",
    "TrainResult",
    "batch_indices",
    "evaluate",
    "fit",
    "make_optimizer",
    "poisson_batches",
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


def poisson_batches(
    n: int, sample_rate: float, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """One epoch of Poisson-sampled batches: ``round(1 / sample_rate)`` batches, each example in each
    batch independently with probability ``sample_rate`` (so batch sizes vary and may be 0).

    This is the sampling the DP-SGD accountants assume (Abadi et al. 2016; Mironov et al. 2019);
    shuffled fixed-size batches are not. Pass ``functools.partial(poisson_batches,
    sample_rate=q)`` -- with ``n`` and ``generator`` left free -- as :func:`train`'s ``batch_sampler``.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    for _ in range(max(1, round(1.0 / sample_rate))):
        mask = torch.rand(n, generator=generator) < sample_rate
        yield mask.nonzero().flatten()


BatchSampler = Callable[[int, "torch.Generator | None"], Iterable[torch.Tensor]]


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
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    batch_sampler: BatchSampler | None = None,
    device: torch.device | str | None = None,
    record_losses: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` for ``epochs`` passes or ``steps`` mini-batches.

    The batch order comes from ``generator`` (pass a seeded one for repeatable runs). The hooks
    (``loss_fn``, ``penalty``, ``grad_hook``, ``batch_sampler``, ``device``) are described in the
    module docstring. An empty batch (possible under Poisson sampling) counts as a step with no
    gradient from data; ``grad_hook`` still runs, so DP noise is still added.
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
    sampler = batch_sampler or (lambda n, generator: batch_indices(n, batch_size, generator))
    dev = torch.device(device) if device is not None else None
    model.train()
    done = 0
    batch_losses: list[torch.Tensor] = []  # summed once at the end: no Python float per step
    batch_sizes: list[int] = []
    epoch = 0
    limit = steps if steps is not None else math.inf  # hoisted: the hot loop of every run
    while epochs is None or epoch < epochs:
        for idx in sampler(len(x), generator=generator):
            if done >= limit:
                break
            nb = idx.shape[0]  # not len(idx): Tensor.__len__ is a Python call
            xb, yb = x[idx], y[idx]
            if dev is not None:
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            if nb == 0:  # an empty Poisson batch: no data term
                loss = sum(p.sum() * 0.0 for p in model.parameters())
            elif loss_fn is None:
                loss = F.cross_entropy(model(xb), yb)
            else:
                loss = loss_fn(model, xb, yb)
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_hook is not None:
                grad_hook(model)
            opt.step()
            batch_losses.append(loss.detach())
            batch_sizes.append(nb)
            done += 1
        epoch += 1
        if done >= limit:
            break
    total_samples = sum(batch_sizes)
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
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        xb, yb = xb.to(dev), yb.to(dev)
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
