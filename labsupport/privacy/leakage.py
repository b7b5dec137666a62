"""What an update leaks: gradient inversion and membership inference, the attacks DP is measured against.

Chapter 02 opens with "FL keeps the data on the device, but the updates leak", and shows it:

* **Gradient inversion** -- Zhu, Liu & Han, "Deep Leakage from Gradients" (NeurIPS 2019), with the
  improvements of Geiping et al., "Inverting Gradients" (NeurIPS 2020): find an input ``x̂`` whose
  gradient matches the shared one, minimizing the cosine distance

      1 - <∇θ ℓ(x̂, ŷ), g> / (‖∇θ ℓ(x̂, ŷ)‖ ‖g‖)  +  λ_TV · TV(x̂)           (Geiping et al., eq. 4)

  with the label read off the gradient first (Zhao et al. 2020, iDLG: for one example under
  cross-entropy, the last layer's bias gradient ``softmax - onehot(y)`` is negative only at ``y``).
  :func:`shared_gradient` is what a FedSGD client sends (optionally clipped and noised as DP-SGD does),
  :func:`invert_gradient` is the attack. Clipping alone only rescales the gradient -- the cosine
  distance does not care -- so it does not stop the attack; clip + noise does.
* **Membership inference** -- was this example in the training set? The loss-threshold attack of
  Yeom et al. (CSF 2018) scores an example by ``-loss``; LiRA (Carlini et al., "Membership Inference
  Attacks From First Principles", S&P 2022) trains shadow models on random halves of the data, fits a
  Gaussian to the logit-scaled confidence ``φ = log(p_y / (1 - p_y))`` of each example when IN and when
  OUT of a shadow's training set, and scores the target model's ``φ`` by the likelihood ratio
  (online LiRA, eq. 4 of the paper). Both are reported as ROC AUC and TPR at 1% FPR
  (:func:`mia_metrics`), the metric Carlini et al. argue for.

The chapter reruns both attacks on DP-trained models (:mod:`labsupport.privacy.dpsgd`) to show what
DP buys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dpsgd import clip_per_sample, per_sample_grads

__all__ = [
    "InversionResult",
    "example_losses",
    "infer_label",
    "invert_gradient",
    "lira_scores",
    "logit_confidence",
    "membership_experiment",
    "mia_metrics",
    "psnr",
    "shared_gradient",
]


# ------------------------------------------------------------------------------ gradient inversion


def shared_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The gradient a FedSGD client shares for batch ``(x, y)``: the batch mean of the per-example gradients.

    With ``max_grad_norm`` each example is clipped to C first (DP-SGD); with ``noise_multiplier`` σ > 0
    Gaussian noise of std σ·C is added to the sum before dividing by the batch size.
    """
    if noise_multiplier > 0 and max_grad_norm is None:
        raise ValueError(
            "noise_multiplier > 0 needs max_grad_norm: noise σ·C is scaled by the clip C"
        )
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    grads, _ = per_sample_grads(model, x, y)
    if max_grad_norm is None:
        summed = {k: g.sum(0) for k, g in grads.items()}
    else:
        summed, _ = clip_per_sample(grads, max_grad_norm)
    out = {}
    for k, g in summed.items():
        if noise_multiplier > 0:
            g = g + torch.normal(
                0.0, noise_multiplier * max_grad_norm, g.shape, generator=generator
            )
        out[k] = (g / len(x)).detach()
    return out


def infer_label(grads: Mapping[str, torch.Tensor]) -> int:
    """iDLG's label: the index of the one negative entry of the last bias gradient (one example, CE).

    The last 1-D entry of ``grads`` is taken as the output layer's bias.
    """
    biases = [g for g in grads.values() if g.ndim == 1]
    if not biases:
        raise ValueError("no 1-D (bias) gradient found: cannot infer the label")
    return int(biases[-1].argmin())


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 3:
        return (x[..., 1:] - x[..., :-1]).abs().mean()
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


@dataclass
class InversionResult:
    """The reconstructed input, the label used, and the gradient-matching loss per step."""

    x: torch.Tensor
    label: int
    losses: list[float] = field(default_factory=list)


def invert_gradient(
    model: nn.Module,
    target: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...],
    *,
    label: int | None = None,
    steps: int = 300,
    lr: float = 0.1,
    tv_weight: float = 1e-3,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
) -> InversionResult:
    """Reconstruct one input from its shared gradient ``target`` (Geiping et al. 2020, cosine + TV).

    ``label=None`` infers it from the gradient (:func:`infer_label`). The dummy input starts as
    uniform noise (seeded), is optimized with Adam, and is kept in ``value_range``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    missing = [k for k in names if k not in target]
    if missing:
        raise ValueError(f"the shared gradient lacks parameters {missing}")
    params = [p for k, p in model.named_parameters() if p.requires_grad]
    tgt = [target[k].detach() for k in names]
    tgt_norm = torch.sqrt(sum((t * t).sum() for t in tgt))
    y_hat = torch.tensor([infer_label(target) if label is None else int(label)])
    gen = torch.Generator().manual_seed(seed)
    lo, hi = value_range if value_range is not None else (0.0, 1.0)
    x_hat = (lo + (hi - lo) * torch.rand((1, *input_shape), generator=gen)).requires_grad_()
    opt = torch.optim.Adam([x_hat], lr=lr)
    losses = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss_model = F.cross_entropy(model(x_hat), y_hat)
            grads = torch.autograd.grad(loss_model, params, create_graph=True)
            dot = sum((g * t).sum() for g, t in zip(grads, tgt, strict=True))
            norm = torch.sqrt(sum((g * g).sum() for g in grads)) + 1e-12
            loss = 1 - dot / (norm * tgt_norm + 1e-12) + tv_weight * _total_variation(x_hat)
            loss.backward()
            opt.step()
            if value_range is not None:
                with torch.no_grad():
                    x_hat.clamp_(lo, hi)
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return InversionResult(x_hat.detach()[0], int(y_hat), losses)


def psnr(x: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (higher = closer; identical inputs give ``inf``)."""
    mse = float(((x - reference) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))


# ------------------------------------------------------------------------------ membership inference


@torch.no_grad()
def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``(N,)`` in eval mode."""
    was = model.training
    model.eval()
    try:
        return F.cross_entropy(model(x), y, reduction="none")
    finally:
        model.train(was)


@torch.no_grad()
def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic ``φ = log(p_y / (1 - p_y))``, computed stably from the logits: ``(N,)`` float64."""
    was = model.training
    model.eval()
    try:
        logits = model(x).double()
    finally:
        model.train(was)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def mia_metrics(scores, is_member, fpr: float = 0.01) -> dict[str, float]:
    """ROC AUC and the TPR at ``fpr`` (default 1%) of membership scores (higher = "member").

    TPR at a low FPR is the metric Carlini et al. (2022) argue for: an attack that confidently picks
    out a few members is a privacy failure even when its AUC is near 0.5.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.shape != m.shape or s.ndim != 1:
        raise ValueError(
            f"scores and is_member must be 1-D of one length; got {s.shape}, {m.shape}"
        )
    if m.all() or not m.any():
        raise ValueError("is_member needs both members and non-members")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or inf")
    fprs, tprs, _ = roc_curve(m, s)
    return {
        "auc": float(roc_auc_score(m, s)),
        f"tpr_at_{fpr:g}_fpr": float(tprs[fprs <= fpr].max()),
    }


def lira_scores(
    target_conf: torch.Tensor,
    shadow_conf: torch.Tensor,
    shadow_in: torch.Tensor,
    *,
    fixed_variance: bool = True,
) -> torch.Tensor:
    """Online LiRA (Carlini et al. 2022, Algorithm 1): log N(φ; μ_in, σ_in²) - log N(φ; μ_out, σ_out²).

    ``shadow_conf`` and ``shadow_in`` are ``(K, N)``: each shadow model's φ on every example and whether
    the example was in its training set. With ``fixed_variance`` one global σ per side is used (the
    paper's choice for few shadows). An example never IN (or never OUT) of a shadow gets the global
    mean of that side.
    """
    if shadow_conf.shape != shadow_in.shape or shadow_conf.ndim != 2:
        raise ValueError(
            f"shadow_conf and shadow_in must both be (K, N); got {tuple(shadow_conf.shape)} and "
            f"{tuple(shadow_in.shape)}"
        )
    if target_conf.shape != shadow_conf.shape[1:]:
        raise ValueError(
            f"target_conf must be ({shadow_conf.shape[1]},), got {tuple(target_conf.shape)}"
        )
    conf = shadow_conf.double()
    inside = shadow_in.bool()
    if not inside.any() or inside.all():
        raise ValueError(
            "LiRA needs shadow models with examples both IN and OUT of their training sets"
        )

    def side(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = mask.sum(0)
        total = (conf * mask).sum(0)
        global_mean = conf[mask].mean()
        mean = torch.where(count > 0, total / count.clamp(min=1), global_mean)
        resid = (conf - mean[None]) * mask
        if fixed_variance or bool((count < 2).any()):
            std = torch.sqrt((resid**2).sum() / mask.sum().clamp(min=1)).expand_as(mean)
        else:
            std = torch.sqrt((resid**2).sum(0) / (count - 1))
        return mean, std.clamp(min=1e-6)

    mu_in, sd_in = side(inside)
    mu_out, sd_out = side(~inside)
    t = target_conf.double()
    log_in = torch.distributions.Normal(mu_in, sd_in).log_prob(t)
    log_out = torch.distributions.Normal(mu_out, sd_out).log_prob(t)
    return log_in - log_out


def membership_experiment(
    train_fn: Callable[[torch.Tensor, torch.Tensor, int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_shadows: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float] | np.ndarray]:
    """Both attacks on one target model: trained by ``train_fn(x, y, seed)`` on a random half of ``(x, y)``.

    The other half are the non-members. ``num_shadows`` shadow models are trained the same way on
    other random halves (the attacker knows the training recipe and has data from the same
    population, LiRA's threat model). Returns ``{"loss_threshold": metrics, "lira": metrics,
    "is_member": mask}``; with ``num_shadows=0`` only the loss-threshold attack runs.
    """
    n = len(x)
    if n < 4:
        raise ValueError(f"need at least 4 examples for a membership experiment, got {n}")
    rng = np.random.default_rng(seed)

    def half() -> torch.Tensor:
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[: n // 2]] = True
        return torch.from_numpy(mask)

    members = half()
    target = train_fn(x[members], y[members], seed)
    result: dict = {"is_member": members.numpy()}
    result["loss_threshold"] = mia_metrics(-example_losses(target, x, y).numpy(), members.numpy())
    if num_shadows > 0:
        confs, ins = [], []
        for k in range(num_shadows):
            mask = half()
            shadow = train_fn(x[mask], y[mask], seed + 1000 + k)
            confs.append(logit_confidence(shadow, x, y))
            ins.append(mask)
        scores = lira_scores(logit_confidence(target, x, y), torch.stack(confs), torch.stack(ins))
        result["lira"] = mia_metrics(scores.numpy(), members.numpy())
    return result
