"""Capstone 1's checks pass the solutions and name each plausible mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.checks import (
    CheckFailed,
    check_hospital_clients,
    check_privacy_audit,
    check_private_secure_transforms,
)
from labsupport.fl import DataClient
from labsupport.privacy import dpfedavg
from labsupport.privacy.accounting import compute_epsilon
from labsupport.privacy.leakage import example_losses, mia_metrics
from labsupport.privacy.secagg import SecAggTransform


@pytest.fixture(scope="module")
def sol(solutions):
    return solutions("capstone_healthcare")


def test_solutions_pass_every_capstone_check(sol, capsys):
    check_private_secure_transforms(sol["private_secure_transforms"], seed=0)
    check_hospital_clients(sol["hospital_clients"], seed=0)
    check_privacy_audit(sol["privacy_audit"], seed=0)
    assert capsys.readouterr().out.count("passed") == 3


# ------------------------------------------------------------------ step 1: the pipeline
def _pipeline(
    clip, sigma, m, k, ledger, seed=0, *, expected=None, q=None, charge=True, order="ok", sec=None
):
    noise = dpfedavg.ServerGaussianNoise(
        sigma,
        clip,
        m if expected is None else expected,
        seed=seed,
        ledger=ledger if charge else None,
        sample_rate=(m / k if q is None else q) if charge else None,
    )
    secagg = SecAggTransform(clip if sec is None else sec, seed=seed)
    if order == "secagg first":
        return [secagg, dpfedavg.ClipUpdate(clip), noise]
    if order == "no secagg":
        return [dpfedavg.ClipUpdate(clip), noise]
    if order == "no clip":
        return [noise, secagg]
    return [dpfedavg.ClipUpdate(clip), noise, secagg]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"order": "no secagg"}, "no SecAggTransform"),
        ({"expected": 1}, "σ·S = "),
        ({"expected": 100}, "expected σ·S/m"),
        ({"order": "secagg first"}, "refused your pipeline"),
        ({"charge": False}, "not charged"),
        ({"q": 0.25}, "charged at q"),
        ({"order": "no clip", "sec": 50.0}, "not clipped"),
    ],
)
def test_pipeline_check_names_the_mistake(options, message):
    def wrong(clip, sigma, m, k, ledger, seed=0):
        return _pipeline(clip, sigma, m, k, ledger, seed, **options)

    with pytest.raises(CheckFailed, match=message):
        check_private_secure_transforms(wrong, seed=1)


def test_secagg_alone_clipping_to_s_is_accepted():
    """SecAggTransform clips to its own norm: with it set to S the sensitivity bound holds."""

    def secagg_clips(clip, sigma, m, k, ledger, seed=0):
        return _pipeline(clip, sigma, m, k, ledger, seed, order="no clip")

    check_private_secure_transforms(secagg_clips, seed=1)


# ------------------------------------------------------------------ step 2: FedProx clients
def _clients(parts, mu, *, factor=0.5, ignore_mu=False):
    def hooks(ctx, global_state):
        if mu == 0 or ignore_mu:
            return {}
        anchors = {k: v.detach().clone() for k, v in global_state.items()}

        def penalty(model):
            return (
                factor
                * mu
                * sum((p - anchors[n]).pow(2).sum() for n, p in model.named_parameters())
            )

        return {"penalty": penalty}

    return [DataClient(x, y, hooks_for_round=hooks) for x, y in parts]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"ignore_mu": True}, "plain FedAvg"), ({"factor": 1.0}, "mu/2")],
)
def test_clients_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_hospital_clients(lambda parts, mu: _clients(parts, mu, **options), seed=2)


def test_clients_check_refuses_one_hospitals_data_for_all():
    def same_data(parts, mu):
        return _clients([parts[0]] * len(parts), mu)

    with pytest.raises(CheckFailed, match="samples"):
        check_hospital_clients(same_data, seed=2)


# ------------------------------------------------------------------ step 3: the audit
def _audit(
    model,
    members,
    non_members,
    *,
    noise_multiplier,
    rounds,
    hospitals_per_round,
    num_hospitals,
    delta,
    q=None,
    steps=None,
    flip=False,
):
    rate = hospitals_per_round / num_hospitals if q is None else q
    eps = compute_epsilon(
        noise_multiplier, rate, rounds if steps is None else steps, delta, "opacus_rdp"
    ).value
    sign = 1.0 if flip else -1.0
    scores = torch.cat(
        [sign * example_losses(model, *members), sign * example_losses(model, *non_members)]
    )
    member = np.r_[np.ones(len(members[1]), bool), np.zeros(len(non_members[1]), bool)]
    return {"epsilon": eps, "mia_auc": mia_metrics(scores.numpy(), member)["auc"]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 1}, "ONE round"),
        ({"flip": True}, "upside down"),
        ({"q": 1.0}, "q = 1"),
    ],
)
def test_audit_check_names_the_mistake(options, message):
    with pytest.raises(CheckFailed, match=message):
        check_privacy_audit(lambda *a, **kw: _audit(*a, **kw, **options), seed=3)


def test_audit_check_refuses_the_naive_running_sum():
    def naive(model, members, non_members, **kw):
        out = _audit(model, members, non_members, **kw)
        q = kw["hospitals_per_round"] / kw["num_hospitals"]
        return {**out, "epsilon": kw["noise_multiplier"] * q * kw["rounds"]}

    with pytest.raises(CheckFailed, match="naive running sum"):
        check_privacy_audit(naive, seed=3)
