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
  ``vmap``): one vectorized backward pass, no hooks. Models must be written out-of-place.
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
) -> tuple[Grads, torch.Tensor]:
    """Per-example gradients ``{name: (B, *param.shape)}`` and per-example losses ``(B,)``.

    ``torch.func.vmap`` over ``grad`` of the model applied (``functional_call``) to one example.
    Buffers are passed through unchanged (no BatchNorm: its batch statistics mix examples).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: Mapping[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses


def flat_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example L2 norm over all parameters: ``(B,)``."""
    parts = [g.reshape(g.shape[0], -1).norm(dim=1) for g in grads.values()]
    return torch.stack(parts, dim=1).norm(dim=1)


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], max_grad_norm: float
) -> tuple[Grads, torch.Tensor]:
    """Clip every example's gradient to norm C and SUM over the batch: ``({name: Σ_i ḡ_i}, norms)``.

    The factor is ``min(1, C / (‖g_i‖ + 1e-6))``, Opacus's; ``norms`` are the unclipped norms.
    """
    c = _check_positive("max_grad_norm", max_grad_norm)
    norms = flat_norms(grads)
    factor = (c / (norms + 1e-6)).clamp(max=1.0)
    summed = {k: torch.einsum("i,i...->...", factor.to(g.dtype), g) for k, g in grads.items()}
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
    ) -> None:
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

    @property
    def batch_sampler(self):
        """Poisson sampling at rate q: what the accountants assume (not shuffled fixed batches)."""
        q = self.sample_rate
        # train() calls sampler(n, generator) positionally, so partial(..., sample_rate=q) would clash
        return lambda n, generator=None: poisson_batches(n, q, generator)

    def loss_fn(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        grads, losses = per_sample_grads(model, xb, yb, self.loss)
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

#: The DP-SGD recipe of the privacy–utility sweep (MNIST-1D, CNN1D), fixed on a validation split
#: (the last 500 training examples), never on the test set: Poisson rate q, epochs, clip C, Adam lr.
#: The non-private line trains the same model for the same steps and batch size with Adam (lr 1e-2,
#: the MNIST-1D paper's optimizer), without clipping or noise.
UTILITY_RECIPE = {
    "sample_rate": 0.25,
    "epochs": 60,
    "max_grad_norm": 0.5,
    "lr": 2.0,
    "momentum": 0.9,
    "nonprivate_lr": 1e-2,
}


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
) -> dict[str, float]:
    """Train a FRESH model with DP-SGD to ``target_epsilon`` (σ calibrated with Opacus's PRV) and test it.

    ``target_epsilon = inf`` trains without clipping or noise (the non-private line) with the same
    optimizer, batch size and number of steps. Returns ``epsilon``, ``sigma``, ``accuracy`` on
    ``split`` (``"test"`` or ``"val"``: the last 500 training examples, held out from training), and
    the loss-threshold membership-inference ``mia_auc`` (training examples vs ``split``).
    """
    from labsupport.data import load_dataset
    from labsupport.models import build_model
    from labsupport.train import evaluate

    from .accounting import calibrate_noise
    from .leakage import example_losses, mia_metrics

    r = {**UTILITY_RECIPE, **(recipe or {})}
    ds = load_dataset("mnist1d")
    x, y = ds.x_train, ds.y_train
    if split == "val":
        x, y, x_eval, y_eval = x[:-500], y[:-500], x[-500:], y[-500:]
    elif split == "test":
        x_eval, y_eval = ds.x_test, ds.y_test
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if num_samples is not None:
        x, y = x[:num_samples], y[:num_samples]
    q = float(r["sample_rate"])
    steps = int((epochs if epochs is not None else r["epochs"]) * round(1 / q))
    net = build_model(model, input_shape=ds.input_shape, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if math.isinf(target_epsilon):
        sigma = 0.0
        train(
            net,
            x,
            y,
            steps=steps,
            batch_size=max(1, round(q * len(x))),
            lr=r["lr"],
            optimizer="adam",
            generator=gen,
        )
    else:
        sigma = calibrate_noise(target_epsilon, delta, q, steps, "opacus_prv")
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
    k = min(len(x), len(x_eval))
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
        "accuracy": acc,
        "mia_auc": auc,
    }
