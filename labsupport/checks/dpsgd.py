"""Checks for exercise 2, DP-SGD and the privacy–utility trade-off (notebook ``06_exercises_dpsgd``).

The reference is chapter 02's DP-SGD (Abadi et al., CCS 2016, Algorithm 1;
:mod:`labsupport.privacy.dpsgd`) and its accountants (:mod:`labsupport.privacy.accounting`):

    g̃ = (Σ_i g_i · min(1, C / ‖g_i‖) + N(0, σ² C² I)) / (q N)

Per-example clipping to norm ``C``, Gaussian noise of standard deviation ``σ·C`` on the *sum*, and
division by the **expected** batch size ``q N`` -- the convention graded here, Opacus's: under Poisson
sampling the actual batch size is random and itself depends on who is in the batch, so dividing by it
leaks it (and an empty batch would divide by zero). Batches are Poisson samples (each example with
probability ``q``), the sampling the accountants assume; ε comes from a real accountant (RDP or
PRV), never from the running sum ``ε += σ·q``.

The noise is checked statistically on a wide gradient (20,000 coordinates: the standard deviation is
estimated to about 1%), so a student may draw it any way they like.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from labsupport.privacy.accounting import compute_epsilon
from labsupport.privacy.dpsgd import clip_per_sample

from ._core import CheckFailed, call, close, ensure, passed, rng

__all__ = [
    "check_clip_and_sum",
    "check_dp_gradient",
    "check_epsilon_spent",
    "check_poisson_batch",
    "check_privacy_utility",
]


def _reference_sum(per_sample: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    if len(per_sample) == 0:
        return torch.zeros(per_sample.shape[1], dtype=per_sample.dtype)
    return clip_per_sample({"g": per_sample}, max_grad_norm)[0]["g"]


def _grads(gen: torch.Generator, batch: int, dim: int, spread: float = 3.0) -> torch.Tensor:
    """Per-example gradients with norms from well below to well above 1."""
    g = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    scale = torch.exp(spread * (torch.rand(batch, 1, generator=gen, dtype=torch.float64) - 0.5))
    return g / g.norm(dim=1, keepdim=True) * scale


def _as_vector(value: object, dim: int, what: str) -> torch.Tensor:
    ensure(
        isinstance(value, torch.Tensor),
        f"{what} returned a {type(value).__name__}; expected a tensor of shape ({dim},)",
    )
    ensure(
        tuple(value.shape) == (dim,),
        f"{what} returned shape {tuple(value.shape)}; expected ({dim},): one gradient, summed over "
        "the batch (dim 0)",
    )
    return value.detach().double()


def check_clip_and_sum(clip_and_sum: Callable, *, seed: int | None = None) -> None:
    """Step 1: ``clip_and_sum(per_sample, max_grad_norm)`` -> ``Σ_i g_i · min(1, C / ‖g_i‖)``.

    ``per_sample`` is ``(B, d)``, one flat gradient per example.
    """
    gen = rng(seed)
    for batch, dim, c in ((16, 7, 1.0), (5, 30, 0.3), (1, 4, 2.0)):
        g = _grads(gen, batch, dim)
        got = _as_vector(
            call(clip_and_sum, g.clone(), c, what=f"a ({batch}, {dim}) batch, C={c}"),
            dim,
            "clip_and_sum",
        )
        want = _reference_sum(g, c)
        if close(got, want, rtol=1e-4, atol=1e-6):
            continue
        total = g.sum(0)
        mean = g.mean(0)
        if close(got, total * min(1.0, c / float(total.norm())), rtol=1e-4) or close(
            got, mean * min(1.0, c / float(mean.norm())), rtol=1e-4
        ):
            raise CheckFailed(
                "you clipped the batch gradient: one example can then steer the whole update. "
                "Clip every example's gradient (each row) to norm C, then sum"
            )
        if close(got, total, rtol=1e-4):
            raise CheckFailed(
                "nothing was clipped: rows with norm above C must be scaled down to C"
            )
        if close(got, g.clamp(-c, c).sum(0), rtol=1e-4):
            raise CheckFailed(
                "you clipped each coordinate to [-C, C]; clip each example's L2 norm to C"
            )
        if close(got, (g / g.norm(dim=1, keepdim=True) * c).sum(0), rtol=1e-4):
            raise CheckFailed(
                "you scaled every row to norm C; rows already shorter than C must stay as they are "
                "(factor min(1, C / ‖g_i‖))"
            )
        if close(got, want / batch, rtol=1e-4):
            raise CheckFailed("return the SUM of the clipped gradients; the division comes later")
        raise CheckFailed(
            f"a ({batch}, {dim}) batch at C={c}: off from Σ_i clip(g_i) by up to "
            f"{float((got - want).abs().max()):.3g}"
        )
    empty = call(clip_and_sum, torch.zeros(0, 6, dtype=torch.float64), 1.0, what="an empty batch")
    got = _as_vector(empty, 6, "clip_and_sum on an empty batch")
    ensure(
        bool(torch.isfinite(got).all()) and float(got.abs().max()) == 0.0,
        "an empty batch (possible under Poisson sampling) must give a zero sum, not NaN",
    )
    passed("clip_and_sum", "per-example clipping to C, summed; an empty batch gives zeros")


def _noise_std(
    dp_gradient: Callable, g: torch.Tensor, c: float, sigma: float, expected: float, seed: int
) -> tuple[torch.Tensor, float]:
    dim = g.shape[1]
    out = _as_vector(
        call(
            dp_gradient,
            g.clone(),
            c,
            sigma,
            expected,
            torch.Generator().manual_seed(seed),
            what=f"{len(g)} examples, C={c}, σ={sigma}, expected batch size {expected}",
        ),
        dim,
        "dp_gradient",
    )
    residual = out * expected - _reference_sum(g, c)
    return out, float(residual.std())


def check_dp_gradient(dp_gradient: Callable, *, seed: int | None = None) -> None:
    """Step 2: ``dp_gradient(per_sample, max_grad_norm, noise_multiplier, expected_batch_size,
    generator)`` -> ``(Σ_i clip(g_i) + N(0, σ²C² I)) / expected_batch_size``."""
    gen = rng(seed)
    # no noise: the clipped sum over the EXPECTED batch size
    g = _grads(gen, 5, 12)
    got = _as_vector(
        call(dp_gradient, g.clone(), 1.0, 0.0, 8.0, None, what="σ=0, 5 examples, expected 8"),
        12,
        "dp_gradient",
    )
    want = _reference_sum(g, 1.0) / 8.0
    if not close(got, want, rtol=1e-4, atol=1e-7):
        if close(got, _reference_sum(g, 1.0) / 5.0, rtol=1e-4):
            raise CheckFailed(
                "you divided by the actual batch size (5 examples) instead of the expected one "
                "(q N = 8): under Poisson sampling the batch size is random and reveals who is in "
                "it; this exercise grades Opacus's convention, the expected batch size"
            )
        if close(got, _reference_sum(g, 1.0), rtol=1e-4):
            raise CheckFailed("divide the noisy sum by the expected batch size q N")
        total = _reference_sum(g, 1.0)
        if close(got * 8.0, total * min(1.0, 1.0 / float(total.norm())), rtol=1e-4):
            raise CheckFailed(
                "the sum was clipped again: you clipped after adding the noise. Clip each example, "
                "sum, then add the noise (and never clip it away)"
            )
        raise CheckFailed(
            "with σ = 0 the result must be Σ_i clip(g_i) / (q N); use your clip_and_sum "
            f"(off by up to {float((got - want).abs().max()):.3g})"
        )
    # noise: its standard deviation on the sum must be σ·C, whatever C and σ
    dim = 20_000
    for c, sigma, expected, batch in ((4.0, 1.0, 10.0, 10), (0.5, 2.0, 6.0, 3)):
        g = _grads(gen, batch, dim)
        noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        out, std = _noise_std(dp_gradient, g, c, sigma, expected, noise_seed)
        target = sigma * c
        if abs(std / target - 1) < 0.05:
            continue
        if std < 1e-12:
            raise CheckFailed(f"σ = {sigma} but no noise was added")
        if float(out.norm()) * expected <= batch * c * 1.001:
            raise CheckFailed(
                "your noisy gradient has a norm of at most B·C: you clipped after adding the noise. "
                "Clip each example first, then add noise to the sum (clipping the noise away removes "
                "the privacy)"
            )
        if abs(std / sigma - 1) < 0.05:
            raise CheckFailed(
                f"the noise has standard deviation σ = {sigma}; it must be σ·C = {target} "
                "(the noise must hide one clipped example, whose size is C)"
            )
        if abs(std / (target * expected) - 1) < 0.05:
            raise CheckFailed(
                "the noise was added after dividing by the batch size: add N(0, σ²C²) to the SUM"
            )
        raise CheckFailed(
            f"C={c}, σ={sigma}: the noise on the sum has standard deviation {std:.3g}; expected "
            f"σ·C = {target:.3g}"
        )
    # an empty Poisson batch: pure noise, still divided by the expected batch size
    empty = torch.zeros(0, dim, dtype=torch.float64)
    try:
        out = dp_gradient(empty, 1.0, 1.0, 4.0, torch.Generator().manual_seed(1))
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CheckFailed(
            f"an empty batch (it happens under Poisson sampling) raised {type(exc).__name__}: the "
            "step still releases noise / (q N)"
        ) from exc
    out = _as_vector(out, dim, "dp_gradient on an empty batch")
    ensure(
        bool(torch.isfinite(out).all()) and abs(float(out.std()) * 4.0 - 1.0) < 0.05,
        "an empty batch must give N(0, σ²C²) / (q N): finite noise, not NaN (division by the "
        "actual size 0?) and not zero",
    )
    a = _as_vector(dp_gradient(empty[:, :50], 1.0, 1.0, 4.0, None), 50, "dp_gradient")
    b = _as_vector(dp_gradient(empty[:, :50], 1.0, 1.0, 4.0, None), 50, "dp_gradient")
    ensure(not torch.equal(a, b), "two steps drew the same noise: draw fresh noise every step")
    passed(
        "dp_gradient",
        "clip, sum, noise σ·C on the sum, divide by the expected batch size; empty batches work",
    )


def check_poisson_batch(poisson_batch: Callable, *, seed: int | None = None) -> None:
    """Step 3: ``poisson_batch(n, sample_rate, generator)`` -> the indices of the examples drawn,
    each independently with probability ``sample_rate`` (so the batch size varies)."""
    gen = rng(seed)
    n, q = 400, 0.05
    sizes, counts = [], torch.zeros(n)
    for _ in range(300):
        idx = call(poisson_batch, n, q, gen, what=f"n={n}, q={q}")
        ensure(
            isinstance(idx, torch.Tensor)
            and idx.ndim == 1
            and not idx.is_floating_point()
            and idx.dtype != torch.bool,
            f"poisson_batch returned {type(idx).__name__} {getattr(idx, 'shape', '')}; expected a "
            "1-D integer tensor of example indices",
        )
        ensure(
            len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n),
            f"indices must lie in [0, {n})",
        )
        ensure(len(set(idx.tolist())) == len(idx), "an example appeared twice in one batch")
        sizes.append(len(idx))
        counts[idx] += 1
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    mean, var = float(sizes_t.mean()), float(sizes_t.var())
    ensure(
        abs(mean - n * q) < 0.15 * n * q,
        f"the mean batch size is {mean:.1f}; expected about q·n = {n * q:.0f}",
    )
    if var < 0.3 * n * q * (1 - q):
        raise CheckFailed(
            f"every batch has (nearly) the same size ({min(sizes)}-{max(sizes)}): that is a shuffled "
            "fixed-size batch. The accountants assume Poisson sampling: each example joins "
            f"independently with probability q, so sizes vary (variance q(1-q)n ≈ {n * q * (1 - q):.0f})"
        )
    ensure(
        float(counts.min()) > 0,
        "some examples were never drawn in 300 batches: every example must have probability q",
    )
    ensure(
        var < 2.0 * n * q * (1 - q),
        f"batch sizes vary too much (variance {var:.1f}, expected about {n * q * (1 - q):.1f})",
    )
    passed("poisson_batch", f"mean size {mean:.1f} (q·n = {n * q:.0f}), variance {var:.1f}")


def _accepted(sigma: float, q: float, steps: int, delta: float) -> tuple[float, float]:
    """The accepted range's ends: 0.98x Opacus's PRV estimate (numerically tight) and its RDP bound."""
    prv = compute_epsilon(sigma, q, steps, delta, "opacus_prv").value
    rdp = compute_epsilon(sigma, q, steps, delta, "opacus_rdp").value
    return 0.98 * min(prv, rdp), rdp


def check_epsilon_spent(epsilon_spent: Callable) -> None:
    """Step 4: ``epsilon_spent(noise_multiplier, sample_rate, steps, delta)`` -> ε (a float) from a
    real accountant. Accepted: from 0.98x Opacus's PRV estimate to 1.01x its RDP bound (RDP, PLD and
    PRV accountants all land there; PRV was 6-30% below RDP in these settings)."""
    settings = ((1.0, 0.05, 300, 1e-5), (0.8, 0.01, 100, 1e-5), (2.0, 0.1, 1000, 1e-6))
    loose = float(call(epsilon_spent, 1.0, 0.05, 300, 1e-2, what="δ = 1e-2"))
    tight = float(call(epsilon_spent, 1.0, 0.05, 300, 1e-8, what="δ = 1e-8"))
    if math.isclose(tight, 1.0 * 0.05 * 300, rel_tol=1e-6):
        raise CheckFailed(
            "ε = σ·q·steps: that is the naive running sum (it grows with the noise and ignores δ); "
            "use a real accountant"
        )
    ensure(loose < tight, "ε must depend on δ: a smaller δ costs a larger ε")
    for sigma, q, steps, delta in settings:
        got = call(epsilon_spent, sigma, q, steps, delta, what=f"σ={sigma}, q={q}, {steps} steps")
        ensure(
            isinstance(got, (int, float)) and not isinstance(got, bool),
            f"epsilon_spent returned a {type(got).__name__}; expected ε as a float",
        )
        got = float(got)
        low, rdp = _accepted(sigma, q, steps, delta)
        if low <= got <= 1.01 * rdp:
            continue
        if math.isclose(got, sigma * q * steps, rel_tol=1e-6):
            raise CheckFailed(
                f"ε = σ·q·steps = {got:.3g}: that is the naive running sum (more noise would mean "
                f"more ε); a real accountant gives {rdp:.3g} (RDP) at δ={delta:g}"
            )
        one = compute_epsilon(sigma, q, 1, delta, "opacus_rdp").value
        if math.isclose(got, one * steps, rel_tol=0.05):
            raise CheckFailed(
                "you added up one step's ε over the steps (linear composition); compose with an "
                f"accountant instead: {rdp:.3g} (RDP), not {got:.3g}"
            )
        raise CheckFailed(
            f"σ={sigma}, q={q}, {steps} steps, δ={delta:g}: ε = {got:.4g}; a real accountant gives "
            f"{rdp:.4g} (Opacus RDP; PRV is a little lower)"
        )
    more = float(call(epsilon_spent, 2.0, 0.05, 300, 1e-5, what="σ = 2"))
    less = float(call(epsilon_spent, 1.0, 0.05, 300, 1e-5, what="σ = 1"))
    ensure(more < less, "more noise must mean LESS ε")
    passed("epsilon_spent", "within the RDP/PRV range, depends on δ, falls with σ")


def check_privacy_utility(
    rows: Sequence[Mapping[str, float]], *, delta: float, tolerance: float = 0.03
) -> None:
    """Step 5: one row per point of the sweep, with keys ``target_epsilon``, ``sigma``,
    ``sample_rate``, ``steps``, ``epsilon`` (spent, from your accountant) and ``accuracy``; the
    non-private point has ``target_epsilon = inf`` and ``sigma = 0``."""
    ensure(
        len(rows) >= 3, f"got {len(rows)} points; sweep at least two ε values and the non-private"
    )
    private = [r for r in rows if math.isfinite(float(r["target_epsilon"]))]
    public = [r for r in rows if not math.isfinite(float(r["target_epsilon"]))]
    ensure(len(public) == 1, "include exactly one non-private point (target_epsilon = inf, σ = 0)")
    ensure(len(private) >= 2, "include at least two private points")
    for r in private:
        low, spent = _accepted(float(r["sigma"]), float(r["sample_rate"]), int(r["steps"]), delta)
        ensure(
            low <= float(r["epsilon"]) <= 1.01 * spent,
            f"at target ε={r['target_epsilon']} the reported ε {float(r['epsilon']):.3g} does not "
            f"match (σ={float(r['sigma']):.3g}, q, steps): an accountant gives {spent:.3g}",
        )
        ensure(
            float(r["epsilon"]) <= float(r["target_epsilon"]) * (1 + tolerance),
            f"target ε={r['target_epsilon']} but {float(r['epsilon']):.3g} was spent: calibrate σ "
            "for the target",
        )
        ensure(0.0 <= float(r["accuracy"]) <= 1.0, "accuracy must be a fraction in [0, 1]")
    private = sorted(private, key=lambda r: float(r["target_epsilon"]))
    sigmas = [float(r["sigma"]) for r in private]
    ensure(
        all(a > b for a, b in itertools.pairwise(sigmas)),
        f"σ must fall as the target ε grows; got {sigmas}",
    )
    ensure(
        float(public[0]["accuracy"]) >= float(private[0]["accuracy"]),
        "the non-private model is less accurate than the most private one: was each point trained "
        "from a fresh model, with the same recipe?",
    )
    passed(
        "privacy-utility sweep",
        f"ε from {float(private[0]['epsilon']):.2g} to {float(private[-1]['epsilon']):.2g}: "
        f"accuracy {float(private[0]['accuracy']):.3f} to {float(private[-1]['accuracy']):.3f}, "
        f"{float(public[0]['accuracy']):.3f} without DP",
    )
