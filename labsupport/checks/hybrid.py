"""Checks for exercise 4, confidence routing with a cloud fallback (``06_exercises_hybrid``).

The reference is chapter 05's router (:mod:`labsupport.hybrid.routing`): offload an input when the
edge model's top-1 probability is below a threshold (a tie stays on the edge), and choose the
threshold on *validation* data as the smallest offload whose hybrid accuracy is within ``gap`` of the
cloud's (:func:`~labsupport.hybrid.routing.choose_threshold`, target ``"cloud_gap"``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from labsupport.hybrid.routing import choose_threshold, max_softmax, route

from ._core import CheckFailed, call, ensure, passed, rng

__all__ = ["check_answer_with_fallback", "check_choose_threshold", "check_offload_mask"]


def _probs(gen: torch.Generator, n: int, c: int = 5) -> torch.Tensor:
    return torch.softmax(torch.randn(n, c, generator=gen) * 2, dim=1)


def check_offload_mask(offload_mask: Callable, *, seed: int | None = None) -> None:
    """Step 1: ``offload_mask(probs, threshold)`` -> boolean (N,) mask, ``max_c p_c < threshold``."""
    gen = rng(seed)
    one = _probs(gen, 1)
    got = call(offload_mask, one, 0.5, what="a batch of one input")
    ensure(
        isinstance(got, torch.Tensor),
        f"offload_mask returned a {type(got).__name__}; expected a boolean tensor, one per input",
    )
    probs = _probs(gen, 64)
    try:
        got = offload_mask(probs, 0.6)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CheckFailed(
            f"offload_mask works for one input but raised {type(exc).__name__} on a batch of 64: "
            "decide for the whole batch at once (no .item())"
        ) from exc
    want = route(max_softmax(probs), 0.6)
    ensure(
        isinstance(got, torch.Tensor) and tuple(got.shape) == (64,),
        f"for 64 inputs expected a mask of shape (64,), got {getattr(got, 'shape', got)!r}",
    )
    ensure(got.dtype == torch.bool, f"the mask has dtype {got.dtype}; expected torch.bool")
    if not torch.equal(got, want):
        if torch.equal(got, ~want):
            raise CheckFailed(
                "the mask is inverted: True must mean 'send to the cloud' (low confidence)"
            )
        raise CheckFailed(
            f"{int((got != want).sum())} of 64 decisions differ: offload where the top-1 "
            "probability is below the threshold"
        )
    tie = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    got = call(offload_mask, tie, 0.7, what="a top-1 probability equal to the threshold")
    ensure(
        got.tolist() == [False, True],
        "a top-1 probability equal to the threshold must stay on the edge (offload only below it)",
    )
    passed("offload_mask", "batched, boolean, ties stay on the edge")


def _apply(threshold: float, conf: np.ndarray, edge: np.ndarray, cloud: np.ndarray):
    off = conf < threshold
    return float(off.mean()), float(np.where(off, cloud, edge).mean())


def check_choose_threshold(choose: Callable, *, trials: int = 5, seed: int | None = None) -> None:
    """Step 2: ``choose(confidence, edge_correct, cloud_correct, gap)`` -> threshold reaching the
    cloud's accuracy within ``gap`` with the least offload."""
    gen = rng(seed)
    for t in range(trials):
        n = int(torch.randint(50, 400, (1,), generator=gen))
        conf = torch.rand(n, generator=gen).numpy()
        conf = np.round(conf, 2) if t == 0 else conf  # ties on the first trial
        edge = torch.rand(n, generator=gen).numpy() < conf  # confident -> more often right
        cloud = torch.rand(n, generator=gen).numpy() < 0.9
        gap = [0.0, 0.005, 0.02][t % 3]
        ref = choose_threshold(conf, edge, cloud, target="cloud_gap", gap=gap)
        got = call(choose, conf.copy(), edge.copy(), cloud.copy(), gap, what=f"{n} inputs")
        ensure(
            isinstance(got, (float, int, np.floating)) and not isinstance(got, bool),
            f"returned a {type(got).__name__}; expected the threshold as a number",
        )
        off, acc = _apply(float(got), conf, edge, cloud)
        goal = cloud.mean() - gap
        if acc < goal - 1e-12:
            raise CheckFailed(
                f"with your threshold the hybrid accuracy is {acc:.3f}, below the cloud's "
                f"{cloud.mean():.3f} minus gap {gap} (trial {t}, {n} inputs)"
            )
        if off > ref.offload + 1e-12:
            hint = (
                " (you maximized accuracy; the target is the *least* offload that meets it)"
                if acc >= ref.accuracy
                else ""
            )
            raise CheckFailed(
                f"your threshold offloads {off:.3f} of the inputs; {ref.offload:.3f} meets the "
                f"target{hint}"
            )
    passed("choose_threshold", f"{trials} random validation sets, ties included")


class _Cloud:
    """A fake cloud that answers, or fails like a network does."""

    def __init__(self, answers: torch.Tensor, fail: type[Exception] | None = None) -> None:
        self.answers, self.fail, self.calls = answers, fail, []

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        self.calls.append(index.clone())
        if self.fail is not None:
            raise self.fail("cloud unreachable")
        return self.answers[index]


def check_answer_with_fallback(answer: Callable, *, seed: int | None = None) -> None:
    """Step 3: ``answer(edge_probs, cloud, threshold)`` -> ``(predictions, source)``: the cloud's
    answer for offloaded inputs; the edge's, marked ``"degraded"``, when the cloud fails."""
    gen = rng(seed)
    probs = _probs(gen, 40)
    cloud_pred = torch.randint(0, 5, (40,), generator=gen)
    off = route(max_softmax(probs), 0.6)
    edge_pred = probs.argmax(1)
    cloud = _Cloud(cloud_pred)
    got = call(answer, probs, cloud, 0.6, what="a reachable cloud")
    ensure(
        isinstance(got, tuple) and len(got) == 2,
        "expected (predictions, source): a tensor of answers and a list of 'edge'/'cloud'/'degraded'",
    )
    pred, source = got
    ensure(len(cloud.calls) <= 1, f"the cloud was called {len(cloud.calls)} times; send one batch")
    if cloud.calls:
        sent = cloud.calls[0]
        ensure(
            torch.equal(torch.as_tensor(sent).sort().values, off.nonzero().flatten()),
            "the cloud must get exactly the offloaded inputs (by index), not the whole batch",
        )
    ensure(
        torch.equal(torch.as_tensor(pred), torch.where(off, cloud_pred, edge_pred)),
        "predictions must be the cloud's where offloaded, else the edge's argmax",
    )
    want = ["cloud" if o else "edge" for o in off.tolist()]
    ensure(list(source) == want, "source must say 'cloud' for offloaded inputs, 'edge' otherwise")
    for failure in (TimeoutError, ConnectionError):
        down = _Cloud(cloud_pred, failure)
        try:
            pred, source = answer(probs, down, 0.6)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise CheckFailed(
                f"with the cloud down ({failure.__name__}) your function raised "
                f"{type(exc).__name__}: it must keep answering from the edge"
            ) from exc
        ensure(
            torch.equal(torch.as_tensor(pred), edge_pred),
            "with the cloud down, every answer must be the edge's",
        )
        want = ["degraded" if o else "edge" for o in off.tolist()]
        ensure(
            list(source) == want,
            "with the cloud down, offloaded inputs must be marked 'degraded' (the edge answered "
            "what it was not confident about)",
        )
    none = _Cloud(cloud_pred)
    call(answer, probs, none, 0.0, what="a threshold that offloads nothing")
    ensure(not none.calls or len(none.calls[0]) == 0, "nothing to offload: do not call the cloud")
    passed("answer_with_fallback", "cloud answers when up, degraded edge answers when down")
