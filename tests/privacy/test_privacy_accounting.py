"""Accountants, the Epsilon type and the budget ledger, checked against the libraries they wrap."""

from __future__ import annotations

import json
import math

import pytest

from labsupport.privacy.accounting import (
    BudgetExceeded,
    Epsilon,
    PrivacyLedger,
    calibrate_noise,
    check_delta,
    compare_accountants,
    compute_epsilon,
    naive_epsilon,
)


def test_naive_epsilon_runs_backwards_with_more_noise():
    less, more = naive_epsilon(1.0, 0.1, 100), naive_epsilon(4.0, 0.1, 100)
    assert more.value > less.value  # the bug the chapter shows: more noise, "more" epsilon
    assert (
        compute_epsilon(4.0, 0.1, 100, 1e-5, "opacus_rdp").value
        < compute_epsilon(1.0, 0.1, 100, 1e-5, "opacus_rdp").value
    )
    assert "WRONG" in str(less) and "no δ" in str(less)
    assert less.value == pytest.approx(1.0 * 0.1 * 100)


def test_opacus_rdp_equals_dp_accounting_rdp_and_prv_is_tighter():
    rows = {e.accountant: e.value for e in compare_accountants(1.0, 64 / 1600, 125, 1e-5)}
    assert rows["opacus_rdp"] == pytest.approx(3.5618, rel=1e-3)  # NOTES.md's worked example
    assert rows["dpa_rdp"] == pytest.approx(rows["opacus_rdp"], rel=1e-3)
    assert rows["opacus_prv"] < rows["opacus_rdp"]
    assert rows["dpa_pld"] == pytest.approx(rows["opacus_prv"], rel=0.02)


def test_compute_epsilon_matches_opacus_directly():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.3, 0.02, 500)]
    assert compute_epsilon(1.3, 0.02, 500, 1e-5, "opacus_rdp").value == pytest.approx(
        acc.get_epsilon(1e-5)
    )


def test_epsilon_str_names_delta_accountant_sampling_and_neighbours():
    text = str(compute_epsilon(1.0, 0.05, 10, 1e-5, "opacus_prv"))
    for part in ("δ=1e-05", "Opacus PRV", "Poisson", "add/remove one example", "σ=1"):
        assert part in text


def test_infinite_epsilon_is_shown_as_inf():
    e = Epsilon(float("inf"), 1e-5, "opacus_prv")
    assert "inf" in str(e) and not e.finite


def test_zero_steps_spend_nothing():
    assert compute_epsilon(1.0, 0.1, 0, 1e-5, "opacus_rdp").value == 0.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_noise_multiplier_is_refused(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        compute_epsilon(sigma, 0.1, 10, 1e-5)


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5])
def test_sample_rate_outside_unit_interval_is_refused(q):
    with pytest.raises(ValueError, match="sample_rate"):
        compute_epsilon(1.0, q, 10, 1e-5)


def test_delta_not_below_one_over_n_is_refused_or_warned():
    with pytest.raises(ValueError, match="1/N"):
        check_delta(1e-3, 1000)
    with pytest.warns(UserWarning, match="1/N"):
        check_delta(1e-3, 1000, strict=False)
    assert check_delta(1e-5, 1000) == 1e-5
    with pytest.raises(ValueError, match="1/N"):
        PrivacyLedger(1.0, 0.01, num_samples=100)


def test_calibrated_noise_meets_the_target_epsilon():
    sigma = calibrate_noise(2.0, 1e-5, 0.01, 1000, "opacus_rdp")
    eps = compute_epsilon(sigma, 0.01, 1000, 1e-5, "opacus_rdp").value
    assert 1.95 <= eps <= 2.0
    with pytest.raises(ValueError, match="inf"):
        calibrate_noise(float("inf"), 1e-5, 0.01, 10)


def test_ledger_refuses_before_spending_and_keeps_events_not_a_sum():
    ledger = PrivacyLedger(target_epsilon=3.0, delta=1e-5, accountant="opacus_rdp")
    first = ledger.spend(1.0, 0.01, 100)
    assert ledger.events == [(1.0, 0.01, 100)]
    assert first.value == pytest.approx(compute_epsilon(1.0, 0.01, 100, 1e-5, "opacus_rdp").value)
    before = list(ledger.events)
    with pytest.raises(BudgetExceeded, match="refused before spending"):
        ledger.spend(1.0, 0.01, 100_000)
    assert ledger.events == before  # nothing was charged
    ledger.spend(1.0, 0.01, 50)
    assert ledger.events == [(1.0, 0.01, 150)]  # merged, and ε is recomputed from the events:
    assert ledger.epsilon().value == pytest.approx(
        compute_epsilon(1.0, 0.01, 150, 1e-5, "opacus_rdp").value
    )
    assert ledger.epsilon().value < 2 * first.value  # sub-linear composition, not a running sum


def test_ledger_equals_the_library_it_wraps_for_mixed_events():
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger(10.0, 1e-5, accountant="opacus_rdp")
    ledger.spend(1.0, 0.01, 100)
    ledger.spend(2.0, 0.05, 30)
    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 100), (2.0, 0.05, 30)]
    assert ledger.epsilon().value == pytest.approx(acc.get_epsilon(1e-5))


def test_ledger_state_round_trips_through_json():
    ledger = PrivacyLedger(5.0, 1e-5, accountant="opacus_rdp", num_samples=1000)
    ledger.spend(1.1, 0.02, 40)
    state = json.loads(json.dumps(ledger.state_dict()))
    restored = PrivacyLedger.from_state_dict(state)
    assert restored.events == ledger.events
    assert restored.epsilon().value == pytest.approx(ledger.epsilon().value)
    other = PrivacyLedger(5.0, 1e-6, accountant="opacus_rdp")
    with pytest.raises(ValueError, match="delta"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="noise_multiplier"):
        restored.load_state_dict({**state, "events": [[0.0, 0.02, 1]]})


def test_ledger_remaining_steps_is_the_last_affordable_step():
    ledger = PrivacyLedger(1.0, 1e-5, accountant="opacus_rdp")
    k = ledger.remaining_steps(1.0, 0.01)
    assert ledger.can_spend(1.0, 0.01, k) and not ledger.can_spend(1.0, 0.01, k + 1)


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon(1.0, 0.1, 10, 1e-5, "moments")
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(1.0, 1e-5, accountant="naive")


def test_prv_gives_inf_or_a_number_never_nan():
    e = compute_epsilon(0.3, 1.0, 5, 1e-5, "opacus_prv")
    assert not math.isnan(e.value)
