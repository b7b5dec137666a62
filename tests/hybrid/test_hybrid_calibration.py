"""Temperature scaling and ECE (labsupport.hybrid.calibration), checked against numpy."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from labsupport.hybrid.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)


def _numpy_ece(probs, labels, n_bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    edges = np.linspace(0, 1, n_bins + 1)
    for lo, hi in pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return total


def _overconfident(n, seed, sharpen=3.0):
    """Labels drawn from softmax(z); the model reports softmax(sharpen * z): overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 10))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(10, p=row) for row in p])
    return torch.tensor(sharpen * z), torch.tensor(y)


def test_ece_hand_worked_example():
    # two samples at confidence 0.9 (one right) -> |0.5 - 0.9|; one at 0.6 (right) -> |1 - 0.6|
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    expected = 2 / 3 * 0.4 + 1 / 3 * 0.4
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected)


def test_ece_matches_numpy_reference_and_bins_cover_all_samples():
    logits, y = _overconfident(800, 1)
    probs = torch.softmax(logits, 1).numpy()
    assert expected_calibration_error(probs, y.numpy()) == pytest.approx(
        _numpy_ece(probs, y.numpy()), abs=1e-12
    )
    b = reliability_bins(probs, y.numpy())
    assert b["count"].sum() == 800 and len(b["count"]) == 15


def test_fitted_temperature_minimizes_nll_like_a_grid_search():
    logits, y = _overconfident(1000, 2)
    t = fit_temperature(logits, y)
    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 2001))
    best = grid[np.argmin([nll(logits, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=5e-3)
    assert t == pytest.approx(3.0, rel=0.15)  # the sharpening it has to undo


def test_calibration_lowers_ece_on_a_held_out_split_and_keeps_the_argmax():
    val_logits, val_y = _overconfident(1500, 3)
    test_logits, test_y = _overconfident(1500, 4)
    t = fit_temperature(val_logits, val_y)
    before = expected_calibration_error(torch.softmax(test_logits, 1), test_y)
    after = expected_calibration_error(apply_temperature(test_logits, t), test_y)
    assert after < 0.5 * before
    assert torch.equal(apply_temperature(test_logits, t).argmax(1), test_logits.argmax(1))


def test_temperature_of_a_calibrated_model_is_near_one():
    logits, y = _overconfident(3000, 5, sharpen=1.0)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 4)), np.array([0, 1]), "logits must be"),
        (np.zeros((2, 4)), np.array([0, 4]), "labels must lie"),
        (np.array([[np.nan, 0.0]]), np.array([0]), "NaN"),
        (np.zeros((0, 4)), np.zeros(0, dtype=int), "empty"),
    ],
)
def test_bad_inputs_are_rejected(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)


def test_apply_temperature_rejects_non_positive_t():
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.zeros((1, 2)), 0.0)


def test_fit_temperature_works_under_inference_mode():
    logits, y = _overconfident(500, 6)
    ref = fit_temperature(logits, y)
    with torch.inference_mode():
        inf_logits = logits * 1.0  # an inference tensor
        assert fit_temperature(inf_logits, y) == pytest.approx(ref)
