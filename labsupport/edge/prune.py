"""Pruning: unstructured magnitude masks vs structured channel removal (chapter 04).

* Unstructured global magnitude pruning (Han et al., "Learning both Weights and Connections for
  Efficient Neural Networks", NeurIPS 2015) with ``torch.nn.utils.prune``: the smallest-|w| weights
  over all Conv/Linear layers are masked to zero. The dense tensors keep their shape, so the file
  and the latency stay the same until the zeros are stored sparsely (:func:`sparse_bytes`) and run
  by a sparse kernel; ``prune.remove`` (:func:`make_permanent`) folds the mask into the weight.
* Repeated pruning compounds on what is left: ``rate`` per step leaves ``(1 - rate)^k`` after ``k``
  steps, so "20% per step" is 1 - 0.8^5 = 67% after five steps, not 100%.
  :func:`per_step_rate` gives the rate that reaches a target sparsity in ``k`` steps.
* Structured channel pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) with
  the ``torch_pruning`` package (Fang et al., "DepGraph", CVPR 2023): whole output channels with the
  smallest L2 norm go, with the layers that depend on them; the final Linear keeps its outputs.
  The network gets narrower: fewer FLOPs, a smaller file, lower latency.
* :func:`prune_and_finetune` -- iterative prune / fine-tune to a target, or one-shot (``steps=1``).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import prune

from labsupport.train import train

__all__ = [
    "channel_counts",
    "compound_sparsity",
    "global_magnitude_prune",
    "make_permanent",
    "per_step_rate",
    "prune_and_finetune",
    "sparse_bytes",
    "sparsity",
    "structured_channel_prune",
]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _check_fraction(name: str, value: float, upper_open: bool = True) -> None:
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")


def compound_sparsity(rate: float, steps: int) -> float:
    """Sparsity after ``steps`` rounds that each prune ``rate`` of the remaining weights."""
    _check_fraction("rate", rate, upper_open=False)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return 1.0 - (1.0 - rate) ** steps


def per_step_rate(target: float, steps: int) -> float:
    """The per-step rate that reaches ``target`` sparsity after ``steps`` rounds: 1-(1-target)^(1/k)."""
    _check_fraction("target", target)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return 1.0 - (1.0 - target) ** (1.0 / steps)


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]


def global_magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """Mask ``amount`` of the *still unpruned* Conv/Linear weights, smallest |w| first, in place.

    Calling it again prunes ``amount`` of what is left (the masks compound). Returns ``model``.
    """
    _check_fraction("amount", amount)
    params = _weights(model)
    if not params:
        raise ValueError("model has no Conv1d/Conv2d/Linear weights to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """``prune.remove`` on every pruned layer: the zeros move into ``weight``, the mask goes."""
    for m, name in _weights(model):
        if prune.is_pruned(m) and hasattr(m, f"{name}_mask"):
            prune.remove(m, name)
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all Conv/Linear weights (masked or permanent)."""
    zeros, total = 0, 0
    for m, name in _weights(model):
        w = getattr(m, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    if total == 0:
        raise ValueError("model has no Conv1d/Conv2d/Linear weights")
    return zeros / total


def sparse_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the Conv/Linear weights stored dense and as CSR (values + int64 indices).

    CSR keeps each non-zero's value and column index, plus one row pointer per row: below about
    2/3 sparsity (float32 values, int64 indices) it is *larger* than dense.
    """
    dense, csr = 0, 0
    for m, name in _weights(model):
        w = getattr(m, name).detach()
        dense += w.numel() * w.element_size()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            s = w.reshape(w.shape[0], -1).to_sparse_csr()
        for t in (s.values(), s.col_indices(), s.crow_indices()):
            csr += t.numel() * t.element_size()
    return {"dense": dense, "csr": csr}


def _final_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear classifier to keep intact")
    return linears[-1]


def structured_channel_prune(
    model: nn.Module, example: torch.Tensor, ratio: float = 0.5
) -> nn.Module:
    """Remove ``ratio`` of the output channels of every Conv layer (L2-magnitude), on a deep copy.

    Uses ``torch_pruning.MetaPruner`` with ``MagnitudeImportance(p=2)``; the final Linear's outputs
    (the classes) are never pruned, its inputs shrink with the last Conv. Returns the narrower model.
    """
    import torch_pruning as tp

    _check_fraction("ratio", ratio)
    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        m,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[_final_linear(m)],
    )
    pruner.step()
    return m


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of each Conv layer and output features of each Linear, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def prune_and_finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target: float,
    steps: int,
    finetune_steps: int,
    structured: bool = False,
    lr: float = 1e-3,
    batch_size: int = 100,
    seed: int = 0,
) -> tuple[nn.Module, list[float]]:
    """Prune a deep copy of ``model`` to ``target`` in ``steps`` rounds, fine-tuning after each.

    Unstructured: each round masks :func:`per_step_rate` of the remaining weights (the masks stay
    in place while fine-tuning, so pruned weights stay zero) and the masks are made permanent at
    the end. Structured: each round removes the channel fraction that compounds to ``target``.
    ``finetune_steps`` Adam steps follow each round (``steps=1``: one-shot). Returns the model and
    the sparsity (or kept-channel fraction) after each round.
    """
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    rate = per_step_rate(target, steps)
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(steps):
        if structured:
            m = structured_channel_prune(m, x[:2], rate)
            kept = sum(channel_counts(m).values())
            trace.append(kept)
        else:
            global_magnitude_prune(m, rate)
            trace.append(sparsity(m))
        if finetune_steps:
            train(
                m,
                x,
                y,
                steps=finetune_steps,
                batch_size=batch_size,
                lr=lr,
                optimizer="adam",
                generator=gen,
            )
    if not structured:
        make_permanent(m)
    return m.eval(), trace
