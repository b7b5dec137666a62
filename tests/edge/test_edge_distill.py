"""The distillation loss against a numpy hand computation, its edge cases, and its train() hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labsupport.edge.distill import distill, distill_loss_fn, distillation_loss
from labsupport.models import build_model
from labsupport.train import train


def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_loss(s, t, y, temp, alpha):
    p_t, p_s = _np_softmax(t / temp), _np_softmax(s / temp)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()  # batchmean: per-sample KL, averaged
    ce = -np.log(_np_softmax(s)[np.arange(len(y)), y]).mean()
    return alpha * temp**2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize(("temp", "alpha"), [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (8.0, 1.0)])
def test_loss_matches_a_numpy_hand_computation(temp, alpha):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
    y = rng.integers(0, 10, 6)
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temp, alpha)
    assert float(got) == pytest.approx(_np_loss(s, t, y, temp, alpha), rel=1e-9)


@pytest.mark.filterwarnings("ignore:reduction")
def test_batchmean_is_not_the_elementwise_mean():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    ours = distillation_loss(s, t, y, temperature=1.0, alpha=1.0)
    wrong = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="mean")
    assert float(ours) == pytest.approx(10 * float(wrong), rel=1e-5)


def test_identical_logits_leave_only_the_hard_term():
    s, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert float(distillation_loss(s, s.clone(), y, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(s, s.clone(), y, 3.0, 0.25)) == pytest.approx(
        0.75 * float(F.cross_entropy(s, y)), rel=1e-6
    )


def test_gradient_scale_is_kept_by_t_squared():
    """Hinton et al.: the soft term's gradient shrinks as 1/T^2; the T^2 factor undoes it."""
    torch.manual_seed(0)
    t, y = torch.randn(64, 10) * 0.1, torch.randint(0, 10, (64,))
    norms = []
    for temp in (5.0, 20.0):
        s = (torch.randn(64, 10) * 0.1).requires_grad_()
        distillation_loss(s, t, y, temp, 1.0).backward()
        norms.append(float(s.grad.norm()))
    assert norms[0] / norms[1] == pytest.approx(1.0, rel=0.5)


@pytest.mark.parametrize(("temp", "alpha"), [(0.0, 0.5), (-1.0, 0.5), (2.0, 1.5), (2.0, -0.1)])
def test_bad_temperature_or_alpha_is_rejected(temp, alpha):
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="temperature|alpha"):
        distillation_loss(s, s, torch.zeros(2, dtype=torch.long), temp, alpha)


def test_mismatched_logits_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))


def test_loss_fn_trains_the_student_and_never_the_teacher(mnist1d):
    teacher = build_model("cnn", (40,), 10, seed=1, channels=8)
    before = [p.detach().clone() for p in teacher.parameters()]
    student = build_model("mlp", (40,), 10, seed=0)
    s_before = [p.detach().clone() for p in student.parameters()]
    train(
        student,
        mnist1d.x_train[:200],
        mnist1d.y_train[:200],
        steps=3,
        batch_size=50,
        loss_fn=distill_loss_fn(teacher, 4.0, 0.9),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(s_before, student.parameters(), strict=True))


def test_a_student_distilled_from_itself_matches_soft_targets(mnist1d):
    """With alpha=1 the student learns to copy the teacher's outputs: agreement rises."""
    teacher = build_model("cnn", (40,), 10, seed=1, channels=8).eval()
    student = build_model("cnn", (40,), 10, seed=2, channels=8)
    x = mnist1d.x_train[:500]

    def agree():
        with torch.no_grad():
            return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    start = agree()
    distill(student, teacher, x, mnist1d.y_train[:500], alpha=1.0, steps=150, lr=1e-2)
    assert agree() > max(start, 0.8)
