"""User-level DP on chapter 01's Flower app: Flower's DifferentialPrivacyServerSideFixedClipping.

The ServerApp runs in process over a grid that hands each message straight to the ClientApp (no
SuperLink, no Ray); its DP round is checked against our DP-FedAvg without noise (the clipped,
equally weighted mean) and the noise against its scale σS/m; the ε it reports against Flower's
accountant called directly. A slow test runs it in the Simulation Engine.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flower"))
from flower_testlib import InProcessGrid

from labsupport.fl.clients import DataClient
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.flower.simulation import import_app
from labsupport.privacy import dpfedavg

APP = import_app()
task, server_app = APP["task"], APP["server_app"]


@pytest.fixture
def task_identity(monkeypatch):
    """Messages a strategy creates take their run/node ids from TaskIdentity, set by a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _clipped_mean(k: int, clip: float) -> dict[str, torch.Tensor]:
    """Our DP-FedAvg without noise on the same clients: the equally weighted mean of clipped updates."""
    sim = FedAvgSimulation(
        task.make_model("mlp", seed=0),
        [DataClient(x, y) for x, y in task.client_partitions(k)],
        test=(task.load_data().x_test[:10], task.load_data().y_test[:10]),
        config=FedAvgConfig(num_rounds=1, fraction_train=1.0, batch_size=None, lr=0.05, seed=0),
        aggregator=dpfedavg.FixedDenominatorMean(k),
        transforms=[dpfedavg.ClipUpdate(clip)],
    )
    sim.run(progress=False)
    return sim.global_state


def test_flower_dp_round_is_the_clipped_equal_weight_mean_plus_noise_of_std_sigma_s_over_m(
    task_identity, tmp_path
):
    k, sigma, clip = 3, 0.5, 1e-3  # one full-batch step moves a client by far more than 1e-3
    config = task.AppConfig(
        num_server_rounds=1,
        batch_size=0,
        num_partitions=k,
        dp_noise_multiplier=sigma,
        dp_clipping_norm=clip,
        results_file=str(tmp_path / "dp.json"),
    )
    np.random.seed(0)  # Flower draws its DP noise from numpy's global generator  # noqa: NPY002
    out = server_app.run_fedavg(InProcessGrid(k), config)
    reference = _clipped_mean(k, clip)
    residual = torch.cat([(out["state_dict"][n] - reference[n]).flatten() for n in reference])
    assert residual.numel() > 10_000
    assert float(residual.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(residual.std()) == pytest.approx(sigma * clip / k, rel=0.03)
    # Flower's ε: no amplification, exactly its own accountant's
    dp = json.loads((tmp_path / "dp.json").read_text())["dp"]
    expected = dpfedavg.flower_epsilon(sigma, k, k, 1, 1e-5).value
    assert dp["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert dp["releases"] == 1 and "no amplification" in dp["sampling"]


def test_dp_off_by_default_and_the_clients_report_equal_weights_only_under_dp():
    plain = task.AppConfig()
    assert not plain.dp and "dp-clipping-norm" not in plain.client_config()
    dp = task.AppConfig(dp_noise_multiplier=1.0, dp_clipping_norm=0.5)
    assert dp.dp and dp.client_config()["dp-clipping-norm"] == 0.5
    assert plain.to_run_config()["dp-noise-multiplier"] == 0.0


@pytest.mark.parametrize(
    ("sigma", "clip", "match"),
    [
        (1.0, 0.0, "both"),  # noise without a clip bound protects nothing
        (0.0, 0.5, "both"),  # clipping alone is not DP (and Flower's accountant needs noise)
        (-1.0, 0.5, ">= 0"),
        (1.0, -0.5, ">= 0"),
    ],
)
def test_half_configured_dp_is_refused_with_the_reason(sigma, clip, match):
    with pytest.raises(ValueError, match=match):
        task.AppConfig(dp_noise_multiplier=sigma, dp_clipping_norm=clip)


def test_dp_with_a_robust_aggregator_is_refused_not_silently_replaced():
    with pytest.raises(ValueError, match="weighted-mean"):
        task.AppConfig(dp_noise_multiplier=1.0, dp_clipping_norm=0.5, aggregator="median")


def test_extra_run_config_reaches_the_app_and_is_undone_after_the_block():
    with server_app.extra_run_config({"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5}):
        assert server_app._OVERLAY["dp-clipping-norm"] == 0.5
    assert server_app._OVERLAY == {}
    with (
        pytest.raises(ValueError, match="unknown"),
        server_app.extra_run_config({"dp-noise": 1.0}),
    ):
        pass


@pytest.mark.slow
def test_flower_dp_runs_in_the_simulation_engine_and_reports_flowers_epsilon(tmp_path):
    from labsupport.flower.simulation import run_flower_simulation

    path = tmp_path / "dp.json"
    knobs = {"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5, "results-file": str(path)}
    with server_app.extra_run_config(knobs):
        out = run_flower_simulation(3, num_rounds=1, seed=0)
    dp = json.loads(path.read_text())["dp"]
    assert dp["epsilon"] == pytest.approx(dpfedavg.flower_epsilon(1.0, 3, 3, 1, 1e-5).value)
    assert math.isfinite(out["final_accuracy"])
