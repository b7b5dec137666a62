"""The routing checks pass the solution and fail plausible wrong implementations, naming the error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.checks import (
    CheckFailed,
    check_answer_with_fallback,
    check_choose_threshold,
    check_offload_mask,
)


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("hybrid")


def test_solution_passes_every_routing_check(sol, capsys):
    check_offload_mask(sol["offload_mask"], seed=0)
    check_choose_threshold(sol["choose_threshold"], trials=10, seed=0)
    check_answer_with_fallback(sol["answer_with_fallback"], seed=0)
    assert capsys.readouterr().out.count("passed") == 3


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda p, t: torch.tensor([p.max(1).values.item() < t]), "no .item"),
        (lambda p, t: p.max(1).values <= t, "equal to the threshold"),
        (lambda p, t: p.max(1).values >= t, "inverted"),
        (lambda p, t: (p.max(1).values < t).int(), "torch.bool"),
        (lambda p, t: p[:, 0] < t, "decisions differ"),
    ],
)
def test_offload_mask_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_offload_mask(wrong, seed=1)


def most_accurate(conf, edge, cloud, gap):  # maximizes accuracy instead of minimizing offload
    candidates = np.concatenate([np.unique(conf), [np.inf]])
    accs = [np.where(conf < t, cloud, edge).mean() for t in candidates]
    return float(candidates[int(np.argmax(accs))])


def ignores_gap_direction(conf, edge, cloud, gap):  # first threshold reaching edge accuracy
    for t in np.concatenate([np.unique(conf), [np.inf]]):
        if np.where(conf < t, cloud, edge).mean() >= edge.mean():
            return float(t)
    return float("inf")


def quantile_guess(conf, edge, cloud, gap):  # "offload the bottom 10%"
    return float(np.quantile(conf, 0.1))


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (most_accurate, "least\\* offload"),
        (ignores_gap_direction, "below the cloud"),
        (quantile_guess, "below the cloud"),
        (lambda conf, edge, cloud, gap: float("inf"), "offloads 1.000"),
        (lambda conf, edge, cloud, gap: np.array([0.5]), "expected the threshold as a number"),
    ],
)
def test_choose_threshold_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_choose_threshold(wrong, trials=6, seed=2)


def _variant(sol, kind):
    offload_mask = sol["offload_mask"]

    def answer(probs, cloud, threshold):
        off = offload_mask(probs, threshold)
        pred = probs.argmax(1)
        idx = off.nonzero().flatten()
        if kind == "whole_batch":
            return cloud(torch.arange(len(probs))), ["cloud"] * len(probs)
        if kind == "no_fallback":
            pred[idx] = cloud(idx)
            return pred, ["cloud" if o else "edge" for o in off.tolist()]
        try:
            pred[idx] = cloud(idx)
        except (TimeoutError, ConnectionError):
            return pred, ["cloud" if o else "edge" for o in off.tolist()]  # not marked degraded
        return pred, ["cloud" if o else "edge" for o in off.tolist()]

    return answer


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("whole_batch", "exactly the offloaded inputs"),
        ("no_fallback", "keep answering"),
        ("unmarked", "marked 'degraded'"),
    ],
)
def test_answer_with_fallback_check_names_the_mistake(sol, kind, message):
    with pytest.raises(CheckFailed, match=message):
        check_answer_with_fallback(_variant(sol, kind), seed=3)
