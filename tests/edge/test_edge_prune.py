"""Pruning: compounding rates, global magnitude masks checked against numpy, permanent removal,
sparse storage, and structured pruning that really removes channels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save

from labsupport.edge.prune import (
    channel_counts,
    compound_sparsity,
    global_magnitude_prune,
    make_permanent,
    per_step_rate,
    prune_and_finetune,
    sparse_bytes,
    sparsity,
    structured_channel_prune,
)
from labsupport.models import build_model


def _file_bytes(model):
    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def test_twenty_percent_five_times_is_sixty_seven_percent_not_one_hundred():
    assert compound_sparsity(0.2, 5) == pytest.approx(1 - 0.8**5)
    assert compound_sparsity(0.2, 5) == pytest.approx(0.67232)
    assert per_step_rate(0.9, 1) == pytest.approx(0.9)
    r = per_step_rate(0.9, 5)
    assert (1 - r) ** 5 == pytest.approx(0.1)
    assert compound_sparsity(per_step_rate(0.5, 3), 3) == pytest.approx(0.5)
    assert per_step_rate(0.0, 4) == 0.0


@pytest.mark.parametrize(("target", "steps"), [(1.0, 3), (-0.1, 3), (0.5, 0)])
def test_per_step_rate_rejects_impossible_targets(target, steps):
    with pytest.raises(ValueError):
        per_step_rate(target, steps)


def test_global_prune_zeroes_exactly_the_smallest_magnitudes():
    model = build_model("cnn", (40,), 10, seed=0, channels=8)
    before = np.concatenate(
        [m.weight.detach().abs().numpy().ravel() for m in model.modules() if hasattr(m, "weight")]
    )
    global_magnitude_prune(model, 0.3)
    after = np.concatenate(
        [m.weight.detach().numpy().ravel() for m in model.modules() if hasattr(m, "weight")]
    )
    k = round(0.3 * before.size)
    expected_zero = np.zeros(before.size, bool)
    expected_zero[np.argsort(before, kind="stable")[:k]] = True
    np.testing.assert_array_equal(after == 0, expected_zero)


def test_repeated_pruning_compounds_on_what_is_left():
    model = build_model("cnn", (40,), 10, seed=0, channels=8)
    n = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight"))
    for _ in range(5):
        global_magnitude_prune(model, 0.2)
    assert sparsity(model) == pytest.approx(1 - 0.8**5, abs=5 / n)


def test_unstructured_pruning_keeps_file_size_until_stored_sparsely():
    model = build_model("cnn", (40,), 10, seed=0, channels=16)
    dense_size = _file_bytes(model)
    pruned = global_magnitude_prune(copy.deepcopy(model), 0.9)
    assert _file_bytes(pruned) > dense_size  # with masks: weight_orig AND weight_mask
    make_permanent(pruned)
    assert not any("mask" in k or "orig" in k for k in pruned.state_dict())
    assert _file_bytes(pruned) == dense_size
    assert sparsity(pruned) == pytest.approx(0.9, abs=1e-3)
    sb = sparse_bytes(pruned)
    assert sb["csr"] < sb["dense"]
    dense_sb = sparse_bytes(model)  # no zeros: CSR costs more than dense
    assert dense_sb["csr"] > dense_sb["dense"]
    assert sb["dense"] == 4 * sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight"))


def test_structured_pruning_removes_real_channels_and_keeps_the_classes():
    model = build_model("cnn", (40,), 10, seed=0, channels=16)
    pruned = structured_channel_prune(model, torch.randn(2, 40), 0.5)
    assert channel_counts(pruned) == {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 10}
    assert pruned.fc.in_features == 8 * 5
    assert channel_counts(model)["conv1"] == 16  # original untouched
    assert pruned(torch.randn(3, 40)).shape == (3, 10)
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in pruned.parameters())
    assert n_after < 0.35 * n_before  # conv2/conv3 shrink in both dimensions


def test_prune_and_finetune_reaches_the_target_and_traces_each_step(mnist1d):
    model = build_model("cnn", (40,), 10, seed=0, channels=8)
    pruned, trace = prune_and_finetune(
        model, mnist1d.x_train, mnist1d.y_train, target=0.8, steps=3, finetune_steps=5
    )
    assert len(trace) == 3 and trace[0] < trace[1] < trace[2]
    assert sparsity(pruned) == pytest.approx(0.8, abs=0.01)
    assert sparsity(model) == 0.0
