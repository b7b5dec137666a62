"""DP-FedAvg's transforms and aggregator, and user-level accounting, against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from labsupport.fl.clients import FitReply, RoundContext
from labsupport.fl.transforms import Pipeline
from labsupport.privacy.accounting import BudgetExceeded, PrivacyLedger, compute_epsilon
from labsupport.privacy.dpfedavg import (
    ClientClipAndNoise,
    ClipUpdate,
    FixedDenominatorMean,
    ServerGaussianNoise,
    clip_update,
    flower_epsilon,
    update_norm,
    user_level_epsilon,
)

CTX = RoundContext(server_round=1, client_id=0, seed=5)


def _state(w, b=0.0, steps=3):
    return {
        "w": torch.tensor(w, dtype=torch.float32),
        "b": torch.tensor([b]),
        "n": torch.tensor(steps),
    }


def test_clip_update_scales_floating_entries_only_and_keeps_small_updates():
    delta = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([0.8]))
    assert int(clipped["n"]) == 7
    same, _ = clip_update(delta, 10.0)
    torch.testing.assert_close(same["w"], delta["w"])
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(delta, 0.0)


def test_clip_update_server_side_rejects_an_unclipped_payload():
    t = ClipUpdate(1.0)
    ok = t.encode({"w": torch.tensor([30.0, 40.0])}, CTX)
    assert update_norm(ok) == pytest.approx(1.0)
    t.decode(ok, CTX, {})
    with pytest.raises(ValueError, match="did not clip"):
        t.decode({"w": torch.tensor([30.0, 40.0])}, CTX, {})


def test_fixed_denominator_mean_ignores_claimed_counts_and_divides_by_m():
    g = _state([0.0, 0.0], steps=2)
    replies = [
        FitReply(_state([1.0, 0.0], 1.0, steps=4), num_samples=1e9, client=0),  # a huge claim
        FitReply(_state([0.0, 1.0], 3.0, steps=6), num_samples=1.0, client=1),
    ]
    new = FixedDenominatorMean(expected_clients=4).aggregate(g, replies)
    torch.testing.assert_close(new["w"], torch.tensor([0.25, 0.25]))  # (Δ1 + Δ2) / 4
    torch.testing.assert_close(new["b"], torch.tensor([1.0]))
    assert int(new["n"]) == 5  # integer buffers: the unweighted mean of the replies
    with pytest.raises(ValueError, match="expected_clients"):
        FixedDenominatorMean(0)


def test_one_client_moves_the_fixed_denominator_mean_by_at_most_s_over_m():
    g = _state([0.0, 0.0])
    clip = ClipUpdate(1.0)
    agg = FixedDenominatorMean(expected_clients=5)
    honest = [
        FitReply({**g, "w": clip.encode({"w": torch.tensor([0.1, 0.2])}, CTX)["w"]}, 10.0)
        for _ in range(4)
    ]
    evil = FitReply({**g, "w": clip.encode({"w": torch.tensor([1e6, -1e6])}, CTX)["w"]}, 1e6)
    without = agg.aggregate(g, honest)
    with_evil = agg.aggregate(g, [*honest, evil])
    assert float((with_evil["w"] - without["w"]).norm()) <= 1.0 / 5 + 1e-6


def test_server_noise_has_std_sigma_s_over_m_and_is_replayable():
    t = ServerGaussianNoise(noise_multiplier=2.0, clip_norm=0.5, expected_clients=10, seed=3)
    zeros = {"w": torch.zeros(200_000), "n": torch.tensor(4)}
    a = t.finalize(zeros, zeros, server_round=1)
    assert float(a["w"].std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.01)
    assert int(a["n"]) == 4
    b = ServerGaussianNoise(2.0, 0.5, 10, seed=3).finalize(zeros, zeros, server_round=1)
    assert torch.equal(a["w"], b["w"])
    c = t.finalize(zeros, zeros, server_round=2)
    assert not torch.equal(a["w"], c["w"])
    with pytest.raises(ValueError, match="noise_multiplier"):
        ServerGaussianNoise(0.0, 0.5, 10)


def test_server_noise_charges_the_ledger_and_refuses_before_release():
    ledger = PrivacyLedger(3.0, 1e-5, accountant="opacus_rdp", neighbouring="user")
    t = ServerGaussianNoise(1.0, 1.0, 10, ledger=ledger, sample_rate=0.1)
    zeros = {"w": torch.zeros(3)}
    rounds = 0
    with pytest.raises(BudgetExceeded):
        for r in range(1, 100):
            t.finalize(zeros, zeros, r)
            rounds += 1
    assert ledger.events == [(1.0, 0.1, rounds)]
    assert rounds > 1 and ledger.epsilon().value <= 3.0
    assert t.rounds_noised == list(range(1, rounds + 1))
    state = json.loads(json.dumps(t.state_dict()))
    fresh_ledger = PrivacyLedger(3.0, 1e-5, accountant="opacus_rdp", neighbouring="user")
    fresh = ServerGaussianNoise(1.0, 1.0, 10, ledger=fresh_ledger, sample_rate=0.1)
    fresh.load_state_dict(state)
    assert fresh_ledger.events == ledger.events


def test_aggregator_refuses_a_round_before_it_starts_when_the_budget_is_spent():
    ledger = PrivacyLedger(0.5, 1e-5, accountant="opacus_rdp")
    ledger.events = [(1.0, 0.1, ledger.remaining_steps(1.0, 0.1))]
    agg = FixedDenominatorMean(10, ledger=ledger, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(BudgetExceeded, match="before it started"):
        agg.instructions(7, {})


def test_client_side_noise_sums_to_sigma_s_over_m_on_the_mean():
    m, sigma, clip = 8, 1.5, 0.2
    t = ClientClipAndNoise(sigma, clip, m)
    zeros = {"w": torch.zeros(50_000)}
    payloads = [t.encode(zeros, RoundContext(1, k, seed=100 + k)) for k in range(m)]
    mean = sum(p["w"] for p in payloads) / m
    assert float(mean.std()) == pytest.approx(sigma * clip / m, rel=0.02)
    assert float(payloads[0]["w"].std()) == pytest.approx(sigma * clip / math.sqrt(m), rel=0.02)


def test_transforms_compose_in_a_pipeline():
    p = Pipeline([ClipUpdate(1.0), ServerGaussianNoise(1.0, 1.0, 4)])
    payload = p.encode({"w": torch.tensor([6.0, 8.0])}, CTX)
    torch.testing.assert_close(p.decode(payload, CTX, {}), {"w": torch.tensor([0.6, 0.8])})
    assert [c["name"] for c in p.config()] == ["ClipUpdate", "ServerGaussianNoise"]


def test_user_level_epsilon_amplification_and_its_absence():
    poisson = user_level_epsilon(1.0, 10, 100, 50, 1e-5, accountant="opacus_rdp")
    assert poisson.value == pytest.approx(compute_epsilon(1.0, 0.1, 50, 1e-5, "opacus_rdp").value)
    assert "client" in str(poisson) and "user-level" in str(poisson)
    none = user_level_epsilon(1.0, 10, 100, 50, 1e-5, sampling="none", accountant="opacus_rdp")
    fixed = user_level_epsilon(1.0, 10, 100, 50, 1e-5, sampling="fixed_size")
    assert poisson.value < fixed.value < none.value
    flower = flower_epsilon(1.0, 10, 100, 50, 1e-5)
    assert flower.value == pytest.approx(none.value, rel=0.05)  # no amplification either way
    assert flower.value > 3 * poisson.value
    with pytest.raises(ValueError, match="clients_per_round"):
        user_level_epsilon(1.0, 0, 100, 50, 1e-5)
    with pytest.raises(ValueError, match="sampling"):
        user_level_epsilon(1.0, 10, 100, 50, 1e-5, sampling="shuffle")


def test_flower_dp_wrapper_refuses_an_amplified_accountant():
    from flwr.serverapp import PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.supercore.privacy_accounting import NeighboringRelation

    config = PrivacyConfig(1e-5, 100, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON)
    with pytest.raises(ValueError, match="no-amplification"):
        DifferentialPrivacyServerSideFixedClipping(
            FedAvg(),
            noise_multiplier=1.0,
            clipping_norm=1.0,
            num_sampled_clients=10,
            accountant=RdpAccountant(config),
        )
