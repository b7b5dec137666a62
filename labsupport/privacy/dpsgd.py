"""DP-SGD: per-example clipping and Gaussian noise (Abadi et al., CCS 2016, Algorithm 1), three ways.

Abadi et al.'s step, for a batch ``L_t`` drawn by Poisson sampling with rate ``q`` from ``N`` examples:

    g_i  = ∇ℓ(θ, x_i)                                    per-example gradient
    ḡ_i  = g_i / max(1, ‖g_i‖₂ / C)                      clip each example to norm C
    g̃    = (Σ_i ḡ_i + N(0, σ² C² I)) / (q N)             noise σ·C on the SUM, divide by the
                                                          *expected* batch size qN (Opacus's choice)

Adding or removing one example changes ``Σ_i ḡ_i`` by at most C, so the update moves by at most
``C / (qN)`` and the noise σ·C hides it; the accountants of :mod:`labsupport.privacy.accounting` turn
(σ, q, steps) into (ε, δ).

What is here:

* :func:`naive_batch_clip_and_noise` -- THE COUNTER-EXAMPLE chapter 02 runs first: clip the *batch*
  gradient to C and add noise of a fixed scale. One example can then move the update by up to 2C
  (:func:`one_example_influence` measures it) instead of C/B, so no ε holds.
* :func:`per_sample_grads` -- per-example gradients with ``torch.func`` (``functional_call``, ``grad``,
  ``vmap``): one vectorized backward pass, no hooks, any out-of-place model; or, for models made of
  ``nn.Linear`` / ``nn.Conv1d`` layers, as each layer's input times its output gradient from ONE
  ordinary backward (Goodfellow 2015; Rochette et al. 2019) -- the same numbers, 1.5-2x faster.
* :func:`clipped_grad_sum` -- the clipped sum without storing any per-example gradient: per-example
  norms from Gram matrices ("ghost clipping", Li et al. 2022), then one weighted backward product;
  what :class:`DPSGD` uses where it applies (large batches: the privacy–utility sweep).
* :func:`clip_per_sample`, :func:`noisy_clipped_mean` -- the clipping and noising above, over
  tensors. Clipping uses Opacus's factor ``min(1, C / (‖g_i‖ + 1e-6))`` so that the two agree to
  floating-point rounding (the chapter's test).
* :class:`DPSGD` -- the same as a ``loss_fn`` / ``grad_hook`` pair for :func:`labsupport.train.train`
  (and so for :class:`labsupport.fl.clients.DataClient`: an FL client runs DP-SGD locally), with
  Poisson sampling through ``batch_sampler`` (:func:`labsupport.train.poisson_batches`).
  :func:`train_dp_sgd` is the small trainer around it, with an optional budget ledger;
  :func:`dp_sgd_client` builds a ``DataClient`` that does it every round.
* :func:`make_opacus_private` -- the same with Opacus's ``PrivacyEngine`` (hooks, functorch, ew or
  ghost clipping), for the comparison and the overhead benchmark.

Opacus's ``secure_mode`` (a cryptographically secure noise generator) needs ``torchcsprng``, which does
not install with current torch; the noise here comes from ``torch.Generator`` -- fine for a course,
not for a deployment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from labsupport.train import TrainResult, poisson_batches, train

from .accounting import BudgetExceeded, PrivacyLedger

__all__ = [
    "DPSGD",
    "clip_per_sample",
    "clipped_grad_sum",
    "dp_sgd_client",
    "flat_norms",
    "make_opacus_private",
    "naive_batch_clip_and_noise",
    "noisy_clipped_mean",
    "one_example_influence",
    "per_sample_grads",
    "train_dp_sgd",
]

Grads = dict[str, torch.Tensor]


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return float(value)


# ------------------------------------------------------------------------------ the counter-example


def naive_batch_clip_and_noise(
    max_grad_norm: float, noise_std: float, generator: torch.Generator | None = None
) -> Callable[[nn.Module], None]:
    """WRONG, on purpose: a ``grad_hook`` that clips the *batch-mean* gradient to C and adds N(0, noise_std²).

    The batch gradient is a mean, so one example with a large gradient dominates it; after clipping
    the whole update can point wherever that example wants, with norm C. Adding or removing it moves
    the update by up to 2C (:func:`one_example_influence`), and the fixed noise scale is not tied to
    C at all: no (ε, δ) follows.
    """
    c = _check_positive("max_grad_norm", max_grad_norm)
    s = _check_positive("noise_std", noise_std, allow_zero=True)

    def hook(model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, c)
        for p in params:
            p.grad.add_(torch.randn(p.shape, generator=generator) * s)

    return hook


def one_example_influence(
    per_sample: torch.Tensor, extra: torch.Tensor, max_grad_norm: float
) -> dict[str, float]:
    """How far adding one example (gradient ``extra``) moves the update, naive vs per-example clipping.

    ``per_sample`` is a ``(B, d)`` matrix of flat per-example gradients. Returns the L2 distance
    between the update with and without the extra example for

    * ``naive``: the batch-mean gradient clipped to C (bounded only by 2C);
    * ``per_example``: per-example clipping, sum divided by a fixed (expected) batch size B (≤ C/B);

    and the two bounds ``2C`` and ``C/B``.
    """
    if per_sample.ndim != 2 or extra.ndim != 1 or extra.shape[0] != per_sample.shape[1]:
        raise ValueError(
            f"per_sample must be (B, d) and extra (d,); got {tuple(per_sample.shape)} and "
            f"{tuple(extra.shape)}"
        )
    c = _check_positive("max_grad_norm", max_grad_norm)
    b = per_sample.shape[0]
    with_extra = torch.cat([per_sample, extra[None]])

    def batch_clip(g: torch.Tensor) -> torch.Tensor:
        mean = g.mean(0)
        return mean * min(1.0, c / (float(mean.norm()) + 1e-12))

    def per_example(g: torch.Tensor) -> torch.Tensor:
        factor = (c / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)
        return (g * factor[:, None]).sum(0) / b  # the same fixed denominator both times

    return {
        "naive": float((batch_clip(with_extra) - batch_clip(per_sample)).norm()),
        "per_example": float((per_example(with_extra) - per_example(per_sample)).norm()),
        "naive_bound": 2 * c,
        "per_example_bound": c / b,
    }


# ------------------------------------------------------------------------- per-example gradients


def per_sample_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    *,
    method: str = "auto",
) -> tuple[Grads, torch.Tensor]:
    """Per-example gradients ``{name: (B, *param.shape)}`` and per-example losses ``(B,)``.

    ``method``:

    * ``"vmap"`` -- ``torch.func.vmap`` over ``grad`` of the model applied (``functional_call``) to
      one example. Works for any out-of-place model; on a small CNN its vmapped convolution
      backward (a grouped convolution over the batch) costs 3-4 plain SGD steps.
    * ``"outer"`` -- one ordinary forward and backward to every layer's *output*, then each
      example's weight gradient as the outer product of its layer input and output gradient
      (Goodfellow 2015, "Efficient per-example gradient computations"; for convolutions over the
      unfolded input, Rochette et al. 2019) -- what Opacus's hooks and ``torch``'s expanded
      weights do, without their bookkeeping. Only for models whose parameters all live in
      ``nn.Linear`` / ``nn.Conv1d`` layers, each called once, with cross-entropy.
    * ``"auto"`` (default) -- ``"outer"`` where it applies, else ``"vmap"``.

    Both give the same numbers (the chapter's tests check them against one backward per example
    and against Opacus). Buffers are passed through unchanged (no BatchNorm: its batch statistics
    mix examples).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if method not in ("auto", "vmap", "outer"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'outer', got {method!r}")
    if method != "vmap":
        layers = _outer_layers(model) if loss is F.cross_entropy else None
        if layers is None and method == "outer":
            raise ValueError(
                "method='outer' needs cross-entropy and a model whose parameters all live in "
                "nn.Linear / nn.Conv1d (groups=1, numeric zero padding); use method='vmap'"
            )
        if layers is not None:
            out = _outer_grads(model, layers, x, y)
            if out is not None:
                return out
            if method == "outer":
                raise ValueError("method='outer': a layer ran more than once per forward pass")
    return _vmap_grads(model, x, y, loss)


def _vmap_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Callable
) -> tuple[Grads, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: Mapping[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses


def _outer_layers(model: nn.Module) -> dict[nn.Module, str] | None:
    """``{layer: name prefix}`` if every trainable parameter sits in a supported layer, else None.

    Supported: ``nn.Linear`` and ``nn.Conv1d`` (groups 1, numeric zero padding) whose ``forward`` is
    the stock one (a subclass that changes it may not have outer-product gradients) and whose
    weight is trainable.
    """
    layers: dict[nn.Module, str] = {}
    for prefix, mod in model.named_modules():
        if not any(p.requires_grad for p in mod.parameters(recurse=False)):
            continue
        linear = type(mod).forward is nn.Linear.forward and isinstance(mod, nn.Linear)
        conv = (
            type(mod).forward is nn.Conv1d.forward
            and isinstance(mod, nn.Conv1d)
            and mod.groups == 1
            and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)
        )
        if not ((linear or conv) and mod.weight.requires_grad):
            return None
        layers[mod] = f"{prefix}." if prefix else ""
    return layers or None


def _has_bias(mod: nn.Module) -> bool:
    return mod.bias is not None and mod.bias.requires_grad


def _record(
    model: nn.Module, layers: Mapping[nn.Module, str], x: torch.Tensor, y: torch.Tensor
) -> tuple[list[tuple[nn.Module, torch.Tensor, torch.Tensor]], torch.Tensor] | None:
    """One forward and one backward to the layer outputs: ``([(layer, A, G)], per-example losses)``,
    None if a layer ran more than once.

    Example i's gradient of a layer's ``[weight | bias]`` is ``G_iᵀ A_i``: ``G`` ``(B, T, out)`` is
    the output gradient over the layer's T positions (Conv1d: its output length), ``A`` ``(B, T,
    in)`` the input at those positions (Conv1d: unfolded, ``C·k`` wide), with a column of ones
    appended when the bias is trained (so one product covers weight and bias).
    """
    record: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        record.append((mod, inputs[0].detach(), output))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if len(record) != len(layers) or len({id(m) for m, _, _ in record}) != len(layers):
        return None
    losses = F.cross_entropy(logits, y, reduction="none")
    grad_outputs = torch.autograd.grad(losses.sum(), [o for _, _, o in record])
    out = []
    for (mod, a, _), g in zip(record, grad_outputs, strict=True):
        if isinstance(mod, nn.Linear):
            a = a.reshape(len(a), -1, a.shape[-1])
            g = g.reshape(len(g), -1, g.shape[-1])
        else:  # Conv1d: the weight gradient is the output gradient times the unfolded input
            (k,), (s,), (d,), (p,) = mod.kernel_size, mod.stride, mod.dilation, mod.padding
            a3 = a if a.ndim == 3 else a.unsqueeze(0)
            cols = F.pad(a3, (p, p)).unfold(-1, d * (k - 1) + 1, s)[..., ::d]  # (B, C, L_out, k)
            a = cols.transpose(1, 2).reshape(len(g), g.shape[-1], -1)  # (B, L_out, C·k)
            g = g.transpose(1, 2)  # (B, L_out, out)
        if _has_bias(mod):
            a = F.pad(a, (0, 1), value=1.0)
        out.append((mod, a, g))
    return out, losses.detach()


def _split(mod: nn.Module, prefix: str, w: torch.Tensor, batched: bool) -> Grads:
    """``{name: tensor}`` of a layer's ``[weight | bias]`` product ``w`` (with a batch dim or not)."""
    lead = w.shape[:1] if batched else ()
    if not _has_bias(mod):
        return {prefix + "weight": w.reshape(*lead, *mod.weight.shape)}
    return {
        prefix + "weight": w[..., :-1].reshape(*lead, *mod.weight.shape),
        prefix + "bias": w[..., -1],
    }


def _per_example(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(B, out, in)``: every example's ``G_iᵀ A_i``."""
    if a.shape[1] == 1:  # a plain Linear layer: one outer product
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(g.transpose(1, 2), a)


def _outer_grads(
    model: nn.Module, layers: Mapping[nn.Module, str], x: torch.Tensor, y: torch.Tensor
) -> tuple[Grads, torch.Tensor] | None:
    """Per-example gradients from one backward to the layer outputs (None: a layer ran twice)."""
    recorded = _record(model, layers, x, y)
    if recorded is None:
        return None
    record, losses = recorded
    grads: Grads = {}
    for mod, a, g in record:
        grads.update(_split(mod, layers[mod], _per_example(a, g), batched=True))
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: grads[n] for n in order}, losses


def _ghost_norm_pays(positions: int, size: int) -> bool:
    """Gram matrices (positions²) rather than the per-example gradient (its size)."""
    return positions * positions <= size


def clipped_grad_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    *,
    layers: Mapping[nn.Module, str] | None = None,
) -> tuple[Grads, torch.Tensor, torch.Tensor] | None:
    """``(Σ_i ḡ_i, per-example norms, per-example losses)`` without storing a per-example gradient.

    The same numbers as ``clip_per_sample(per_sample_grads(...))`` for the models ``"outer"``
    supports (None for the others), computed as DP-SGD at large batches wants them ("ghost
    clipping", Goodfellow 2015; Li et al., ICLR 2022): each layer's per-example gradient norm from
    its Gram matrices, ``‖G_iᵀA_i‖² = ⟨G_iG_iᵀ, A_iA_iᵀ⟩`` (for a plain Linear layer simply
    ``‖g_i‖²‖a_i‖²``), or from the materialized gradient where that is smaller (positions² > the
    gradient's size, Opacus's "mixed" rule); then the clipped sum as ONE ordinary weight gradient
    with every example's output gradient scaled by its clip factor. ``layers`` is
    ``_outer_layers(model)`` when the caller keeps it between steps.
    """
    c = _check_positive("max_grad_norm", max_grad_norm)
    if layers is None:
        layers = _outer_layers(model)
    recorded = _record(model, layers, x, y) if layers is not None else None
    if recorded is None:
        return None
    record, losses = recorded
    sq = torch.zeros(len(x), dtype=losses.dtype)
    for _, a, g in record:
        t = a.shape[1]
        if t == 1:
            sq += g.pow(2).sum((1, 2)) * a.pow(2).sum((1, 2))
        elif _ghost_norm_pays(t, a.shape[2] * g.shape[2]):
            sq += (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
        else:
            sq += _per_example(a, g).pow(2).sum((1, 2))
    norms = sq.sqrt()
    factor = (c / (norms + 1e-6)).clamp(max=1.0)
    grads: Grads = {}
    for mod, a, g in record:
        gf = g * factor[:, None, None]
        w = gf.reshape(-1, gf.shape[-1]).T @ a.reshape(-1, a.shape[-1])  # (out, in)
        grads.update(_split(mod, layers[mod], w, batched=False))
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: grads[n] for n in order}, norms, losses


def flat_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example L2 norm over all parameters: ``(B,)``."""
    return torch.linalg.vector_norm(_flatten(grads), dim=1)


def _flatten(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, d)``: every example's gradient as one row (one copy; then one norm, one product)."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], max_grad_norm: float
) -> tuple[Grads, torch.Tensor]:
    """Clip every example's gradient to norm C and SUM over the batch: ``({name: Σ_i ḡ_i}, norms)``.

    The factor is ``min(1, C / (‖g_i‖ + 1e-6))``, Opacus's; ``norms`` are the unclipped norms.
    The per-example gradients are laid out as one ``(B, d)`` matrix, so the norms are one
    reduction and the clipped sum one matrix-vector product, whatever the number of tensors.
    """
    c = _check_positive("max_grad_norm", max_grad_norm)
    if not grads:
        raise ValueError("grads is empty: no per-example gradients to clip")
    flat = _flatten(grads)
    norms = torch.linalg.vector_norm(flat, dim=1)
    factor = (c / (norms + 1e-6)).clamp(max=1.0).to(flat.dtype)
    summed_flat = factor @ flat
    summed, start = {}, 0
    for k, g in grads.items():
        size = g[0].numel()
        summed[k] = summed_flat[start : start + size].view(g.shape[1:])
        start += size
    return summed, norms


def noisy_clipped_mean(
    summed: Mapping[str, torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> Grads:
    """``(Σ ḡ_i + N(0, σ²C²)) / (q N)``; the noise is drawn per tensor in ``summed``'s order.

    The draw is ``torch.normal(0, σC, size, generator=generator)`` per parameter, as Opacus's
    ``DPOptimizer.add_noise`` draws it: with generators in the same state both give the same update.
    """
    c = _check_positive("max_grad_norm", max_grad_norm)
    s = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    b = _check_positive("expected_batch_size", expected_batch_size)
    out = {}
    for k, g in summed.items():
        noise = (
            torch.normal(
                0.0, s * c, size=g.shape, generator=generator, dtype=g.dtype, device=g.device
            )
            if s > 0
            else torch.zeros_like(g)
        )
        out[k] = (g + noise) / b
    return out


# ------------------------------------------------------------------------------ the hooks, a trainer


class DPSGD:
    """DP-SGD as a ``loss_fn`` / ``grad_hook`` / ``batch_sampler`` triple for :func:`labsupport.train.train`.

    ``loss_fn`` computes the per-example gradients with ``vmap``, clips and sums them, and returns the
    mean loss as a detached leaf (so ``train``'s ``backward()`` costs nothing); ``grad_hook`` then writes
    ``(Σ ḡ_i + noise) / (q N)`` into every ``.grad``. An empty Poisson batch (``train`` skips
    ``loss_fn``) still gets its noise. ``steps`` counts the noisy steps taken, for the accountant.

    ``noise_multiplier = 0`` is clipping without noise (no privacy; the leakage demo uses it).
    ``per_sample_method``: ``"auto"`` (default) clips with :func:`clipped_grad_sum` where the model
    allows (Linear / Conv1d layers, cross-entropy) and with ``vmap`` per-example gradients
    otherwise; ``"vmap"`` always uses ``vmap``; ``"outer"`` refuses models it cannot do.
    """

    def __init__(
        self,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        num_samples: int,
        generator: torch.Generator | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        per_sample_method: str = "auto",
    ) -> None:
        if per_sample_method not in ("auto", "vmap", "outer"):
            raise ValueError(
                f"per_sample_method must be 'auto', 'vmap' or 'outer', got {per_sample_method!r}"
            )
        self.per_sample_method = per_sample_method
        self.max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
        self.noise_multiplier = _check_positive(
            "noise_multiplier", noise_multiplier, allow_zero=True
        )
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise TypeError(f"sample_rate must be a number, got {type(sample_rate).__name__}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate (q) must be in (0, 1], got {sample_rate}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        self.sample_rate = float(sample_rate)
        self.num_samples = num_samples
        self.expected_batch_size = self.sample_rate * num_samples
        self.generator = generator
        self.loss = loss
        self.steps = 0
        self.last_norms: torch.Tensor | None = None
        self._pending: Grads | None = None
        self._layers: tuple[nn.Module, dict[nn.Module, str] | None] | None = None

    @property
    def batch_sampler(self):
        """Poisson sampling at rate q: what the accountants assume (not shuffled fixed batches)."""
        q = self.sample_rate
        # train() calls sampler(n, generator) positionally, so partial(..., sample_rate=q) would clash
        return lambda n, generator=None: poisson_batches(n, q, generator)

    def loss_fn(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        fused = None
        if self.per_sample_method != "vmap" and self.loss is F.cross_entropy:
            if self._layers is None or self._layers[0] is not model:  # inspect a model once
                self._layers = (model, _outer_layers(model))
            if self._layers[1] is not None:
                fused = clipped_grad_sum(model, xb, yb, self.max_grad_norm, layers=self._layers[1])
        if fused is not None:
            self._pending, self.last_norms, losses = fused
        elif self.per_sample_method == "outer":
            raise ValueError("per_sample_method='outer' does not support this model or loss")
        else:
            grads, losses = per_sample_grads(model, xb, yb, self.loss, method="vmap")
            self._pending, self.last_norms = clip_per_sample(grads, self.max_grad_norm)
        return losses.mean().detach().requires_grad_()

    def grad_hook(self, model: nn.Module) -> None:
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        summed = self._pending
        if summed is None:  # an empty Poisson batch: nothing clipped, noise only
            summed = {k: torch.zeros_like(p) for k, p in named}
        noisy = noisy_clipped_mean(
            summed,
            self.max_grad_norm,
            self.noise_multiplier,
            self.expected_batch_size,
            self.generator,
        )
        for k, p in named:
            p.grad = noisy[k].to(p.dtype).reshape(p.shape)
        self._pending = None
        self.steps += 1

    def hooks(self) -> dict[str, Any]:
        """``loss_fn``, ``grad_hook`` and ``batch_sampler`` for ``train`` / ``local_update``."""
        return {
            "loss_fn": self.loss_fn,
            "grad_hook": self.grad_hook,
            "batch_sampler": self.batch_sampler,
        }


def train_dp_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 0.1,
    optimizer: str | torch.optim.Optimizer = "sgd",
    momentum: float = 0.0,
    generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    ledger: PrivacyLedger | None = None,
) -> TrainResult:
    """DP-SGD on ``(x, y)``: Poisson batches at rate q, per-example clipping, noise σ·C.

    With a ``ledger`` the steps are charged *before* training: a run that would exceed the budget
    raises :class:`~labsupport.privacy.accounting.BudgetExceeded` and trains nothing. ``epochs`` means
    ``round(1/q)`` Poisson steps each (:func:`labsupport.train.poisson_batches`).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps=")
    dp = DPSGD(
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        num_samples=len(x),
        generator=noise_generator,
    )
    total = steps if steps is not None else epochs * max(1, round(1.0 / dp.sample_rate))
    if ledger is not None:
        if dp.noise_multiplier == 0:
            raise BudgetExceeded("noise_multiplier = 0 has no finite ε: refused by the ledger")
        ledger.spend(dp.noise_multiplier, dp.sample_rate, total)
    return train(
        model,
        x,
        y,
        steps=total,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        generator=generator,
        **dp.hooks(),
    )


def dp_sgd_client(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    noise_seed_offset: int = 0x5EED,
):
    """A :class:`~labsupport.fl.clients.DataClient` that trains with DP-SGD every round.

    The hooks are made per round (``hooks_for_round``), with the noise generator seeded from the
    round's ``ctx.seed`` (replayable; a deployment would use a cryptographic generator). Each local
    epoch is ``round(1/q)`` Poisson steps; example-level ε is ``steps x rounds-participated``
    compositions -- charge them to a :class:`~labsupport.privacy.accounting.PrivacyLedger` per client.
    """
    from labsupport.fl.clients import DataClient

    n = len(x)
    DPSGD(  # validate now, not in the middle of a run
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        num_samples=n,
    )

    def hooks_for_round(ctx, global_state) -> dict[str, Any]:
        gen = torch.Generator().manual_seed((int(ctx.seed) + noise_seed_offset) % 2**63)
        dp = DPSGD(
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            num_samples=n,
            generator=gen,
        )
        return dp.hooks()

    return DataClient(x, y, hooks_for_round=hooks_for_round)


# -------------------------------------------------------------------------------------------- Opacus


def make_opacus_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    max_grad_norm: float,
    noise_multiplier: float,
    lr: float = 0.1,
    poisson_sampling: bool = True,
    grad_sample_mode: str = "hooks",
    noise_generator: torch.Generator | None = None,
    accountant: str = "prv",
):
    """Opacus 1.6's ``PrivacyEngine.make_private`` on an in-memory ``(x, y)`` with plain SGD.

    Returns ``(engine, model, optimizer, loader)`` (and ``criterion`` too for ``"ghost"``, as Opacus
    does: ``(engine, model, optimizer, criterion, loader)``). ``batch_size / len(x)`` is the sample
    rate. Models must be out-of-place (Opacus's hooks fail on in-place ops after a hooked layer).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    _check_positive("max_grad_norm", max_grad_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine = PrivacyEngine(accountant=accountant)
    kwargs: dict[str, Any] = {}
    if grad_sample_mode == "ghost":
        kwargs["criterion"] = nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
        **kwargs,
    )
    return (engine, *out)


# ------------------------------------------------------------------- one point of the utility curve

#: The privacy–utility sweep's data: MNIST-1D generated at 50,000 samples (40,000 train / 10,000 test;
#: the paper's default is 5,000). The size is the biggest lever DP-SGD has: for a fixed batch B the
#: rate q = B/N falls with N, and the same ε buys far less noise per step.
UTILITY_NUM_SAMPLES = 50_000
#: The last ``UTILITY_VAL`` training examples are the validation split the recipe was chosen on; the
#: models train on the rest (36,000). The test set is used only for the reported accuracy.
UTILITY_VAL = 4_000

#: The DP-SGD recipe of the privacy–utility sweep (MNIST-1D, CNN1D), fixed on the validation split,
#: never on the test set: expected batch size (q = batch_size / 36,000), epochs (``round(1/q)``
#: Poisson steps each), clip C and the Adam learning rate. The non-private line is the same recipe
#: minus DP: the same optimizer, learning rate, batch size and number of steps, no clipping, no noise.
#: Chosen at ε = 8, seed 0, by validation accuracy among (batch, epochs, C, lr) = (1000, 20, 1, 3e-3)
#: 0.73, (500, 10, 1, 3e-3) 0.61, (500, 20, 1, 1e-2) 0.91, (1000, 20, 1, 1e-2) 0.90, (1000, 20, 0.2,
#: 1e-2) 0.90, (2000, 30, 1, 1e-2) 0.90, (1000, 40, 1, 1e-2) 0.94, (1000, 20, 1, 3e-2) 0.91,
#: (1000, 20, 1, 5e-2) 0.86, (500, 10, 1, 2e-2) 0.91 and (1000, 20, 1, 2e-2) 0.93 -- the last, a tie
#: with twice the epochs at half the cost. (Tuning on
#: private data spends privacy too; the sweep does not account for it, as is common practice.)
UTILITY_RECIPE = {
    "batch_size": 1000,
    "epochs": 20,
    "max_grad_norm": 1.0,
    "lr": 2e-2,
}


def utility_data(
    split: str = "test", num_samples: int = UTILITY_NUM_SAMPLES, val: int = UTILITY_VAL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_eval, y_eval)`` of the sweep; ``split`` is ``"test"`` or ``"val"``.

    Training data are always the first ``len(train) - val`` training examples, so the recipe chosen
    on ``"val"`` is the one the ``"test"`` numbers use.
    """
    from labsupport.data import load_dataset

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    ds = load_dataset("mnist1d", num_samples=num_samples)
    if not 0 < val < len(ds.y_train):
        raise ValueError(f"val must be in (0, {len(ds.y_train)}), got {val}")
    x, y = ds.x_train[:-val], ds.y_train[:-val]
    if split == "val":
        return x, y, ds.x_train[-val:], ds.y_train[-val:]
    return x, y, ds.x_test, ds.y_test


_SIGMA_CACHE: dict[tuple, float] = {}


def _calibrated_sigma(eps: float, delta: float, q: float, steps: int) -> float:
    """σ for (ε, δ) with Opacus's PRV, remembered: every seed of one ε reuses it (a call takes seconds)."""
    from .accounting import calibrate_noise

    key = (float(eps), float(delta), float(q), int(steps))
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = calibrate_noise(eps, delta, q, steps, "opacus_prv")
    return _SIGMA_CACHE[key]


def privacy_utility_point(
    target_epsilon: float,
    *,
    delta: float = 1e-5,
    seed: int = 0,
    epochs: int | None = None,
    num_samples: int | None = None,
    model: str = "cnn",
    split: str = "test",
    recipe: Mapping[str, float] | None = None,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train a FRESH model with DP-SGD to ``target_epsilon`` (σ calibrated with Opacus's PRV) and test it.

    ``target_epsilon = inf`` is the same recipe minus DP: the same optimizer (Adam), learning rate,
    batch size and number of steps, without clipping or noise. ``data`` is
    :func:`utility_data`'s tuple (loaded from ``split`` when None); ``num_samples`` keeps only the
    first training examples (smoke runs), and ``epochs`` overrides the recipe's. Returns
    ``epsilon``, ``sigma``, ``accuracy`` on the evaluation split, and the loss-threshold
    membership-inference ``mia_auc`` (training examples vs evaluation examples).
    """
    from labsupport.models import build_model
    from labsupport.train import evaluate

    from .leakage import example_losses, mia_metrics

    r = {**UTILITY_RECIPE, **(recipe or {})}
    x, y, x_eval, y_eval = data if data is not None else utility_data(split)
    if num_samples is not None:
        x, y = x[:num_samples], y[:num_samples]
    batch = min(int(r["batch_size"]), len(x))
    q = batch / len(x)
    steps = int((epochs if epochs is not None else r["epochs"]) * max(1, round(1 / q)))
    net = build_model(model, input_shape=tuple(x.shape[1:]), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if math.isinf(target_epsilon):
        sigma = 0.0
        train(net, x, y, steps=steps, batch_size=batch, lr=r["lr"], optimizer="adam", generator=gen)
    else:
        sigma = _calibrated_sigma(target_epsilon, delta, q, steps)
        train_dp_sgd(
            net,
            x,
            y,
            max_grad_norm=r["max_grad_norm"],
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps,
            lr=r["lr"],
            optimizer="adam",
            generator=gen,
            noise_generator=torch.Generator().manual_seed(seed + 10_000),
        )
    acc = evaluate(net, x_eval, y_eval)["accuracy"]
    k = min(len(x), len(x_eval), 2000)
    with torch.no_grad():
        losses = torch.cat(
            [example_losses(net, x[:k], y[:k]), example_losses(net, x_eval[:k], y_eval[:k])]
        )
    member = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
    auc = mia_metrics((-losses).numpy(), member.numpy())["auc"]
    return {
        "epsilon": float(target_epsilon),
        "delta": delta,
        "sigma": sigma,
        "seed": seed,
        "steps": steps,
        "batch_size": batch,
        "num_train": len(x),
        "accuracy": acc,
        "mia_auc": auc,
    }
