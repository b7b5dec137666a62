"""Checks for the short exercises, one per chapter (notebook ``06_exercises_short``).

* chapter 01 -- top-k sparsification *with error feedback* (Stich, Cordonnier & Jaggi 2018):
  ``p = e + Δ``, send the ``k = max(1, round(fraction * numel))`` entries of largest magnitude,
  keep ``e = p - sent`` (reference: :mod:`labsupport.fl.compression`);
* chapter 02 -- pairwise masks that cancel in the sum (Bonawitz et al., CCS 2017, Section 4):
  ``y_u = x_u + Σ_{v > u} PRG(s_uv) - Σ_{v < u} PRG(s_uv) mod 2^bits`` with the ChaCha20 PRG of
  :func:`labsupport.privacy.secagg_masking.prg` (reference: the same arithmetic, written here);
* chapter 03 -- the coordinate-wise trimmed mean (Yin et al. 2018), correct at a trim of zero
  (reference: ``scipy.stats.trim_mean``, which cuts ``int(beta * n)`` values from each end);
* chapter 04 -- the distillation loss (Hinton, Vinyals & Dean 2015): ``T^2 * KL(p_teacher^T ||
  p_student^T)`` averaged over the batch (reference: ``torch.nn.functional.kl_div``, batchmean);
* chapter 05 -- a least-recently-used cache (reference: :class:`labsupport.hybrid.cache.LRUCache`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as F

from labsupport.fl.compression import densify, num_kept, topk_sparsify
from labsupport.hybrid.cache import LRUCache
from labsupport.privacy.secagg_masking import prg

from ._core import CheckFailed, call, close, ensure, passed, rng

__all__ = [
    "check_distillation_loss",
    "check_error_feedback",
    "check_lru_cache",
    "check_pairwise_masks",
    "check_trimmed_mean",
]


# ------------------------------------------------------------------------------ chapter 01
def _reference_sends(deltas: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    residual = torch.zeros_like(deltas[0])
    out = []
    for d in deltas:
        p = residual + d
        idx, val = topk_sparsify(p, num_kept(p.numel(), fraction))
        sent = densify(idx, val, p.shape)
        residual = p - sent
        out.append(sent)
    return out


def check_error_feedback(make_compressor: Callable, *, seed: int | None = None) -> None:
    """``make_compressor(fraction)`` -> an object whose ``compress(delta)`` returns the dense
    tensor sent this round (top-k of delta plus the residual kept from earlier rounds)."""
    gen = rng(seed)
    tiny = call(make_compressor, 0.1, what="fraction 0.1")
    sent = call(tiny.compress, torch.randn(5, generator=gen), what="a 5-entry tensor")
    ensure(
        isinstance(sent, torch.Tensor),
        f"compress returned a {type(sent).__name__}; expected a tensor",
    )
    ensure(
        int((sent != 0).sum()) == 1,
        f"a 5-entry tensor at fraction 0.1 sent {int((sent != 0).sum())} entries; expected 1 "
        "(k = round(fraction * numel), at least one: int() rounds 0.5 down to nothing)",
    )
    deltas = [torch.randn(6, 5, generator=gen) for _ in range(6)]
    comp = call(make_compressor, 0.1, what="fraction 0.1")
    want = _reference_sends(deltas, 0.1)
    for t, d in enumerate(deltas):
        got = call(comp.compress, d.clone(), what=f"round {t + 1}")
        ensure(
            isinstance(got, torch.Tensor) and got.shape == d.shape,
            f"round {t + 1}: compress must return a tensor of the delta's shape {tuple(d.shape)}",
        )
        ensure(
            int((got != 0).sum()) == 3,
            f"round {t + 1}: sent {int((got != 0).sum())} of 30 entries at fraction 0.1; expected 3",
        )
        if close(got, want[t]):
            continue
        if t == 0:
            by_value = densify(*topk_values(d, 3), d.shape)
            if close(got, by_value):
                raise CheckFailed("you kept the largest *values*; keep the largest magnitudes")
            raise CheckFailed("round 1 (no residual yet): send the 3 entries of largest magnitude")
        plain = densify(*topk_sparsify(d, 3), d.shape)
        if close(got, plain):
            raise CheckFailed(
                f"round {t + 1}: you sent the top-k of this round's delta alone; what was not sent "
                "before must be added back (error feedback)"
            )
        raise CheckFailed(
            f"round {t + 1}: what was sent differs from top-k of (residual + delta); the residual "
            "is what was meant to be sent minus what was sent"
        )
    total = sum(deltas)
    residual = total - sum(want)
    passed(
        "error feedback",
        f"after 6 rounds the residual holds {float(residual.abs().sum() / total.abs().sum()):.0%} "
        "of the update mass, the rest was delivered",
    )


def topk_values(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plausible mistake: the k largest *values* (not magnitudes)."""
    flat = t.reshape(-1)
    idx = torch.sort(torch.topk(flat, k).indices).values
    return idx, flat[idx]


# ------------------------------------------------------------------------------ chapter 03
def check_trimmed_mean(trimmed_mean: Callable, *, seed: int | None = None) -> None:
    """``trimmed_mean(updates, beta)``: per coordinate, drop ``int(beta * n)`` of the smallest and
    of the largest of the ``n`` client values, average the rest; ValueError when nothing is left."""
    gen = rng(seed)
    for n, beta in ((3, 0.1), (1, 0.0), (10, 0.0)):
        x = torch.randn(n, 4, generator=gen)
        got = call(trimmed_mean, x, beta, what=f"{n} clients at beta={beta}")
        ensure(
            isinstance(got, torch.Tensor) and bool(torch.isfinite(got).all()),
            f"{n} clients at beta={beta} (k = 0: nothing to trim) gave {got!r}; expected the plain "
            "mean (x[k:-k] is empty when k = 0)",
        )
        ensure(
            close(got, x.mean(0)),
            f"{n} clients at beta={beta}: k = int(beta * n) = 0, so expected the plain mean",
        )
    for n, beta in ((10, 0.1), (7, 0.3), (20, 0.25), (5, 0.45)):
        x = torch.randn(n, 3, 2, generator=gen)
        x[0] += 100  # an outlier on one client
        got = call(trimmed_mean, x.clone(), beta, what=f"{n} clients at beta={beta}")
        want = torch.from_numpy(np.asarray(stats.trim_mean(x.numpy(), beta, axis=0)))
        ensure(
            isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(x.shape[1:]),
            f"{n} clients of shape (3, 2) gave shape {tuple(getattr(got, 'shape', ()))}; expected "
            "(3, 2): trim across clients (dim 0), coordinate by coordinate",
        )
        if not close(got, want, rtol=1e-5, atol=1e-5):
            k = int(beta * n)
            rows = x[x[:, 0, 0].argsort()][k : n - k].mean(0)
            if close(got, rows, atol=1e-5):
                raise CheckFailed(
                    "you trimmed whole clients sorted by one coordinate; trim each coordinate on its own"
                )
            raise CheckFailed(
                f"{n} clients at beta={beta}: expected int(beta * n) = {k} values cut from each end "
                f"of every coordinate; off by up to {float((got - want).abs().max()):.3g}"
            )
    ints = torch.randint(-5, 5, (6, 3), generator=gen)
    got = call(trimmed_mean, ints, 0.2, what="integer updates")
    want = torch.from_numpy(np.asarray(stats.trim_mean(ints.numpy(), 0.2, axis=0)))
    ensure(
        isinstance(got, torch.Tensor) and got.is_floating_point() and close(got, want),
        "integer updates: the mean of integers is not an integer; return floats",
    )
    try:
        trimmed_mean(torch.randn(4, 2, generator=gen), 0.5)
    except NotImplementedError:
        raise
    except ValueError:
        pass
    else:
        raise CheckFailed(
            "beta=0.5 trims every value of 4 clients: raise ValueError, do not return"
        )
    passed("trimmed_mean", "k = 0, one client, outliers, integers, over-trimming")


# ------------------------------------------------------------------------------ chapter 04
def check_distillation_loss(distillation_loss: Callable, *, seed: int | None = None) -> None:
    """``distillation_loss(student_logits, teacher_logits, temperature)`` = T^2 KL(teacher||student)
    of the temperature-softened distributions, summed over classes and averaged over the batch."""
    gen = rng(seed)
    for temperature in (1.0, 4.0, 2.5):
        s = torch.randn(16, 10, generator=gen, requires_grad=True)
        t = torch.randn(16, 10, generator=gen) * 3
        got = call(distillation_loss, s, t, temperature, what=f"T={temperature}")
        ensure(
            isinstance(got, torch.Tensor) and got.ndim == 0,
            f"expected a scalar tensor, got {getattr(got, 'shape', type(got).__name__)}",
        )
        want = temperature**2 * F.kl_div(
            F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean"
        )
        if close(got, want, rtol=1e-4):
            ensure(got.requires_grad, "the loss must stay differentiable in the student's logits")
            continue
        ratio = float(got.detach() / want.detach())
        if abs(ratio - 1 / temperature**2) < 1e-3:
            raise CheckFailed("scale by T^2: softened gradients shrink as 1/T^2 (Hinton et al.)")
        if abs(ratio - 0.1) < 1e-3:
            raise CheckFailed("average over the batch (batchmean), not over batch x classes")
        reverse = temperature**2 * F.kl_div(
            F.log_softmax(t / temperature, 1), F.softmax(s / temperature, 1), reduction="batchmean"
        )
        if close(got, reverse, rtol=1e-4):
            raise CheckFailed("the KL runs the wrong way: the teacher's distribution is the target")
        raise CheckFailed(f"T={temperature}: loss {float(got):.4f}, expected {float(want):.4f}")
    same = torch.randn(4, 3, generator=gen)
    zero = call(distillation_loss, same, same.clone(), 3.0, what="identical logits")
    ensure(abs(float(zero)) < 1e-6, "identical student and teacher logits must give a loss of 0")
    passed("distillation_loss", "T^2-scaled, batchmean KL from the teacher, zero at agreement")


# ------------------------------------------------------------------------------ chapter 05
def check_lru_cache(make_cache: Callable, *, steps: int = 400, seed: int | None = None) -> None:
    """``make_cache(capacity)`` -> an object with ``get(key, default=None)`` and ``put(key, value)``
    that evicts the least recently used key (a get or a put counts as a use)."""
    c = call(make_cache, 2, what="capacity 2")
    call(c.put, "a", 1)
    call(c.put, "b", 2)
    call(c.get, "a")
    call(c.put, "a", 10)
    ensure(c.get("b") == 2, "re-putting a present key evicted another: update it in place")
    ensure(c.get("a") == 10, "put of a present key must replace its value")
    c = call(make_cache, 2, what="capacity 2")
    c.put("a", 1)
    c.put("b", 2)
    ensure(c.get("a") == 1, "a key just put must be found")
    c.put("c", 3)
    ensure(
        c.get("a") == 1,
        "'a' was read after 'b' was put, so 'b' was the least recently used and had to go; you "
        "evicted in insertion order (a get must count as a use)",
    )
    ensure(c.get("b") is None, "'b' was the least recently used key; it should have been evicted")
    c = call(make_cache, 2, what="capacity 2")
    c.put("old", 0)
    for _ in range(3):
        c.get("old")
    c.put("new", 1)
    c.get("new")
    c.put("newer", 2)
    ensure(
        c.get("old") is None and c.get("new") == 1,
        "eviction by count: 'old' was read most often but least recently; an LRU evicts it and "
        "keeps 'new' (a fresh key must not be the next victim)",
    )
    gen = rng(seed)
    for capacity in (1, 3, 8):
        mine, ref = call(make_cache, capacity), LRUCache(capacity)
        keys = torch.randint(0, 3 * capacity, (steps,), generator=gen).tolist()
        ops = torch.rand(steps, generator=gen).tolist()
        for i, (k, op) in enumerate(zip(keys, ops, strict=True)):
            if op < 0.5:
                got, want = mine.get(k), ref.get(k)
                ensure(
                    got == want,
                    f"capacity {capacity}, operation {i}: get({k}) returned {got!r}, expected {want!r}",
                )
            else:
                mine.put(k, i)
                ref.put(k, i)
    passed("LRU cache", f"3 scenarios and {3 * steps} random operations against the reference")


# ------------------------------------------------------------------------------ chapter 02
def _pair_seeds(gen: torch.Generator, n: int) -> dict[tuple[int, int], bytes]:
    """One 32-byte seed per unordered pair (what X25519 + HKDF would agree on), keyed (u, v), u < v."""
    return {
        (u, v): bytes(torch.randint(0, 256, (32,), generator=gen, dtype=torch.uint8).tolist())
        for u in range(n)
        for v in range(u + 1, n)
    }


def _seeds_of(pairs: dict[tuple[int, int], bytes], me: int) -> dict[int, bytes]:
    return {(v if u == me else u): s for (u, v), s in pairs.items() if me in (u, v)}


def _reference_masked(x: np.ndarray, me: int, seeds: dict[int, bytes], bits: int, sign: int = 1):
    mod = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    y = x.copy()
    for peer, seed in seeds.items():
        mask = prg(seed, len(x), bits)
        y = y + mask if (me < peer) == (sign > 0) else y - mask  # uint64 wraps mod 2^64
    return y & mod


def check_pairwise_masks(masked_input: Callable, *, seed: int | None = None) -> None:
    """``masked_input(x, me, pair_seeds, bits)`` -> ``y = x + Σ_{v > me} PRG(s_{me,v}) -
    Σ_{v < me} PRG(s_{v,me}) mod 2^bits`` (Bonawitz et al. 2017): ``x`` a uint64 vector in
    ``Z_{2^bits}``, ``pair_seeds`` ``{peer: 32-byte seed}``. The masks cancel in the sum over clients.
    The opposite sign convention (the larger index adds) cancels as well and is accepted."""
    gen = rng(seed)
    for n, bits, length in ((4, 20, 50), (3, 64, 40), (5, 32, 30)):
        pairs = _pair_seeds(gen, n)
        high = 1 << bits
        xs = [
            np.array(
                [int(v) % high for v in torch.randint(0, 2**62, (length,), generator=gen)],
                dtype=np.uint64,
            )
            for _ in range(n)
        ]
        ys = []
        for me in range(n):
            y = call(
                masked_input,
                xs[me].copy(),
                me,
                _seeds_of(pairs, me),
                bits,
                what=f"client {me} of {n}, bits={bits}",
            )
            ensure(
                isinstance(y, np.ndarray) and y.shape == xs[me].shape,
                f"masked_input returned {type(y).__name__} {getattr(y, 'shape', '')}; expected a "
                f"numpy array of shape {xs[me].shape}",
            )
            ensure(
                y.dtype == np.uint64,
                f"the masked vector has dtype {y.dtype}; keep uint64 (floats lose the low bits "
                "of a 64-bit mask, and the masks then no longer cancel exactly)",
            )
            ensure(
                bits == 64 or int(y.max()) < high,
                f"values reach {int(y.max())} >= 2^{bits}: reduce modulo 2^bits",
            )
            ensure(
                not np.array_equal(y, xs[me]),
                f"client {me}'s masked vector equals its input: the server would see the update",
            )
            ys.append(y)
        mask = np.uint64(high - 1) if bits < 64 else np.uint64(2**64 - 1)
        total = np.zeros(length, dtype=np.uint64)
        for y in ys:
            total = (total + y) & mask
        want = np.zeros(length, dtype=np.uint64)
        for x in xs:
            want = (want + x) & mask
        if not np.array_equal(total, want):
            if all(
                np.array_equal(y, _add_all(xs[me], _seeds_of(pairs, me), bits))
                for me, y in enumerate(ys)
            ):
                raise CheckFailed(
                    "both clients of a pair added their shared mask, so nothing cancels: the client "
                    "with the smaller index adds PRG(s), the other subtracts it"
                )
            raise CheckFailed(
                f"{n} clients, bits={bits}: the sum of the masked vectors is not the sum of the "
                "inputs mod 2^bits -- every pair's mask must enter once with + and once with -"
            )
        for me, y in enumerate(ys):
            seeds = _seeds_of(pairs, me)
            ensure(
                np.array_equal(y, _reference_masked(xs[me], me, seeds, bits, 1))
                or np.array_equal(y, _reference_masked(xs[me], me, seeds, bits, -1)),
                f"client {me}: the sum cancels, but its masked vector is not x ± PRG(seed) of its "
                "pairs (use prg(seed, len(x), bits) for each peer)",
            )
    passed("pairwise masks", "they cancel exactly in the sum mod 2^bits, up to 64 bits")


def _add_all(x: np.ndarray, seeds: dict[int, bytes], bits: int) -> np.ndarray:
    """The plausible mistake: every client adds every mask."""
    mod = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    y = x.copy()
    for s in seeds.values():
        y = y + prg(s, len(x), bits)
    return y & mod
