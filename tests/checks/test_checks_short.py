"""The short exercises' checks pass the solutions and fail plausible wrong implementations."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch.nn import functional as F

from labsupport.checks import (
    CheckFailed,
    check_distillation_loss,
    check_error_feedback,
    check_lru_cache,
    check_trimmed_mean,
)
from labsupport.hybrid.cache import NaiveCountCache


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("short")


def test_solutions_pass_every_short_check(sol, capsys):
    check_error_feedback(sol["TopKWithMemory"], seed=0)
    check_trimmed_mean(sol["trimmed_mean"], seed=0)
    check_distillation_loss(sol["distillation_loss"], seed=0)
    check_lru_cache(sol["LRU"], seed=0)
    assert capsys.readouterr().out.count("passed") == 4


# ------------------------------------------------------------------ error feedback
class _TopK:
    def __init__(self, fraction, *, memory=True, by_value=False, int_k=False):
        self.fraction, self.memory, self.by_value, self.int_k = fraction, memory, by_value, int_k
        self.residual = None

    def compress(self, delta):
        p = delta if (self.residual is None or not self.memory) else self.residual + delta
        n = p.numel()
        k = int(self.fraction * n) if self.int_k else max(1, round(self.fraction * n))
        flat = p.reshape(-1)
        keep = flat.topk(k).indices if self.by_value else flat.abs().topk(k).indices
        sent = torch.zeros_like(flat)
        sent[keep] = flat[keep]
        self.residual = p - sent.reshape(p.shape)
        return sent.reshape(p.shape)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": False}, "error feedback"),
        ({"by_value": True}, "largest \\*values\\*"),
        ({"int_k": True}, "at least one"),
    ],
)
def test_error_feedback_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_error_feedback(lambda fraction: _TopK(fraction, **options), seed=1)


# ------------------------------------------------------------------ trimmed mean
def slicing(updates, beta):  # the naive x[k:-k]
    k = int(beta * updates.shape[0])
    return updates.sort(dim=0).values[k:-k].float().mean(dim=0)


def rows_by_first_coordinate(updates, beta):
    n = updates.shape[0]
    k = int(beta * n)
    if 2 * k >= n:
        raise ValueError("too much")
    flat = updates.reshape(n, -1)
    order = flat[:, 0].argsort()
    return updates[order][k : n - k].float().mean(0)


def keeps_int_dtype(updates, beta):
    n = updates.shape[0]
    k = int(beta * n)
    if 2 * k >= n:
        raise ValueError("too much")
    s = updates.sort(dim=0).values[k : n - k]
    return s.sum(0) // s.shape[0] if not s.is_floating_point() else s.mean(0)


def never_refuses(updates, beta):
    n = updates.shape[0]
    k = min(int(beta * n), (n - 1) // 2)
    return updates.double().sort(dim=0).values[k : n - k].mean(0)


def rounds_k_up(updates, beta):
    import math

    n = updates.shape[0]
    k = math.ceil(beta * n)
    if 2 * k >= n:
        raise ValueError("too much")
    return updates.double().sort(dim=0).values[k : n - k].mean(0)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (slicing, "empty when k = 0"),
        (rows_by_first_coordinate, "whole clients"),
        (keeps_int_dtype, "return floats"),
        (never_refuses, "raise ValueError"),
        (rounds_k_up, "int\\(beta \\* n\\)"),
    ],
)
def test_trimmed_mean_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_trimmed_mean(wrong, seed=2)


# ------------------------------------------------------------------ distillation
def _kd(s, t, temp, *, scale=True, reduction="batchmean", reverse=False):
    a, b = (t, s) if reverse else (s, t)
    loss = F.kl_div(F.log_softmax(a / temp, 1), F.softmax(b / temp, 1), reduction=reduction)
    return loss * temp**2 if scale else loss


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": False}, "T\\^2"),
        ({"reduction": "mean"}, "batchmean"),
        ({"reverse": True}, "wrong way"),
    ],
)
def test_distillation_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_distillation_loss(lambda s, t, temp: _kd(s, t, temp, **options), seed=3)


def test_distillation_check_refuses_a_detached_loss():
    with pytest.raises(CheckFailed, match="differentiable"):
        check_distillation_loss(lambda s, t, temp: _kd(s, t, temp).detach(), seed=3)


# ------------------------------------------------------------------ LRU
class Fifo:
    def __init__(self, capacity):
        self.capacity, self.data = capacity, OrderedDict()

    def get(self, key, default=None):
        return self.data.get(key, default)

    def put(self, key, value):
        self.data[key] = value
        if len(self.data) > self.capacity:
            self.data.popitem(last=False)


class ReputEvicts(Fifo):
    def get(self, key, default=None):
        if key in self.data:
            self.data.move_to_end(key)
        return self.data.get(key, default)

    def put(self, key, value):
        if len(self.data) >= self.capacity:
            self.data.popitem(last=False)
        self.data[key] = value
        self.data.move_to_end(key)


class FixedCountCache(NaiveCountCache):
    """The count-based cache with its re-put bug fixed: still evicts by count."""

    def put(self, key, value):
        if key in self._data:
            self._data[key] = value
            return None
        return super().put(key, value)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (NaiveCountCache, "re-putting a present key"),
        (FixedCountCache, "eviction by count"),
        (Fifo, "insertion order"),
        (ReputEvicts, "re-putting a present key"),
    ],
)
def test_lru_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_lru_cache(wrong, seed=4)
