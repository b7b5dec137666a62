"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

The student minimizes

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

with teacher logits ``z_t``, student logits ``z_s``, temperature ``T`` and the KL averaged over the
batch (``reduction="batchmean"``: the mathematical KL per sample; ``"mean"`` would also divide by the
number of classes). The T^2 factor keeps the soft term's gradient scale independent of T (the
gradients of the softened term shrink as 1/T^2, section 2 of the paper).

* :func:`distillation_loss` -- the formula above on logits;
* :func:`distill_loss_fn` -- the same as a ``loss_fn(model, xb, yb)`` for
  :func:`labsupport.train.train`, the teacher's logits computed per batch under ``no_grad``;
* :func:`distill` -- train a student with it.

Notebook 04 compares a distilled student with the same student trained alone and sweeps T.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.train import train

__all__ = ["distill", "distill_loss_fn", "distillation_loss"]


def _check(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton et al.'s loss: ``alpha T^2 KL(p_t^T || p_s^T)`` (batchmean) + ``(1-alpha) CE``."""
    _check(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def distill_loss_fn(
    teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss_fn`` for :func:`labsupport.train.train`: the teacher (in eval mode) is queried per batch."""
    _check(temperature, alpha)
    teacher.eval()

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(xb)
        return distillation_loss(model(xb), t_logits, yb, temperature, alpha)

    return loss_fn


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    steps: int = 3000,
    lr: float = 1e-2,
    batch_size: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Train ``student`` in place on ``(x, y)`` against ``teacher`` (both already on ``device``)."""
    train(
        student,
        x,
        y,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer="adam",
        generator=torch.Generator().manual_seed(seed),
        loss_fn=distill_loss_fn(teacher, temperature, alpha),
        device=device,
    )
    return student.eval()
