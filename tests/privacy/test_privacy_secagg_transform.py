"""SecAggTransform: the masked pipeline stage gives the (weighted) mean delta of the survivors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl.clients import RoundContext
from labsupport.fl.state import aggregate, state_delta
from labsupport.fl.transforms import Pipeline
from labsupport.privacy.secagg import SecAggTransform
from labsupport.privacy.secagg_masking import clip_to_norm, quantization_bound


def _deltas(num_clients: int, seed: int = 0, bn: bool = False) -> tuple[dict, list[dict]]:
    torch.manual_seed(seed)
    model = (
        nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
        if bn
        else nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
    )
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = []
    for _ in range(num_clients):
        local = {
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v + 3
            for k, v in glob.items()
        }
        deltas.append(state_delta(local, glob))
    return glob, deltas


def _flat(delta: dict) -> np.ndarray:
    return np.concatenate(
        [v.double().reshape(-1).numpy() for v in delta.values() if v.is_floating_point()]
    )


def _run(transform, glob, deltas, cohort, server_round=1, arrive=None):
    payloads = {}
    for cid, delta in zip(cohort, deltas, strict=True):
        ctx = RoundContext(server_round=server_round, client_id=cid, seed=cid, cohort=tuple(cohort))
        try:
            payloads[cid] = Pipeline([transform]).encode(delta, ctx)
        except ValueError:
            continue  # a simulated dropout before the masked input
    if arrive is not None:
        payloads = {c: p for c, p in payloads.items() if c in arrive}
    return transform.aggregate_payloads(payloads, dict.fromkeys(payloads, 1.0), server_round, glob)


def test_mean_delta_matches_the_plain_mean_of_clipped_updates():
    glob, deltas = _deltas(5)
    cohort = [3, 8, 11, 20, 21]
    t = SecAggTransform(clip=0.2, frac_bits=24)
    mean = _run(t, glob, deltas, cohort)
    expected = np.mean([clip_to_norm(_flat(d), 0.2) for d in deltas], axis=0)
    assert np.abs(_flat(mean) - expected).max() <= quantization_bound(5, 24)
    assert (
        mean["0.weight"].shape == glob["0.weight"].shape and mean["0.weight"].dtype == torch.float32
    )
    assert t.last_stats["survivors"] == cohort and t.last_stats["dropped"] == []


def test_weighted_mean_matches_fedavgs_aggregate():
    glob, deltas = _deltas(4, seed=1)
    cohort = [0, 1, 2, 3]
    counts = {0: 10, 1: 400, 2: 37, 3: 90}
    t = SecAggTransform(clip=100.0, frac_bits=20, client_weights=counts)  # clip inactive
    mean = _run(t, glob, deltas, cohort)
    expected = aggregate(deltas, [counts[c] for c in cohort])
    for key in glob:
        assert torch.allclose(mean[key], expected[key], atol=1e-5)


def test_a_client_whose_upload_never_arrives_is_unmasked_as_dropped():
    glob, deltas = _deltas(6, seed=2)
    cohort = list(range(6))
    t = SecAggTransform(clip=1.0, frac_bits=20, threshold=0.6)
    mean = _run(t, glob, deltas, cohort, arrive={0, 1, 2, 4, 5})
    expected = np.mean([clip_to_norm(_flat(deltas[i]), 1.0) for i in (0, 1, 2, 4, 5)], axis=0)
    assert np.abs(_flat(mean) - expected).max() < 1e-5
    assert t.last_stats["dropped"] == [3]


def test_a_malformed_payload_counts_as_a_dropout_not_an_abort():
    glob, deltas = _deltas(5, seed=3)
    cohort = list(range(5))
    t = SecAggTransform(clip=1.0, frac_bits=20)
    payloads = {}
    for cid, d in enumerate(deltas):
        payloads[cid] = t.encode(d, RoundContext(1, cid, cid, tuple(cohort)))
    payloads[2] = {"secagg.masked": payloads[2]["secagg.masked"][:-3]}
    mean = t.aggregate_payloads(payloads, dict.fromkeys(cohort, 1.0), 1, glob)
    expected = np.mean([clip_to_norm(_flat(deltas[i]), 1.0) for i in (0, 1, 3, 4)], axis=0)
    assert np.abs(_flat(mean) - expected).max() < 1e-5
    assert "header declares" in t.last_stats["rejected"][2]


def test_simulated_dropouts_at_every_stage_keep_the_mean_right():
    glob, deltas = _deltas(12, seed=4)
    cohort = list(range(12))
    t = SecAggTransform(
        clip=1.0,
        frac_bits=20,
        threshold=0.55,
        seed=10,
        dropouts={"advertise": 0.1, "shares": 0.1, "masked": 0.1},
    )
    mean = _run(t, glob, deltas, cohort, server_round=2)
    kept = sorted(t.last_stats["survivors"])
    simulated = t.last_stats["simulated_dropouts"]
    assert simulated == {"advertise": [1], "shares": [11], "masked": [2]}  # this seed's draw
    assert kept == [c for c in cohort if c not in (1, 11)]  # 2 sent its input, then vanished
    assert t.last_stats["dropped"] == [11]
    expected = np.mean([clip_to_norm(_flat(deltas[i]), 1.0) for i in kept], axis=0)
    assert np.abs(_flat(mean) - expected).max() < 1e-5


def test_secagg_plus_transform_matches_too():
    glob, deltas = _deltas(10, seed=5)
    t = SecAggTransform(clip=1.0, frac_bits=20, degree=4, threshold=0.6)
    mean = _run(t, glob, deltas, list(range(10)))
    expected = np.mean([clip_to_norm(_flat(d), 1.0) for d in deltas], axis=0)
    assert np.abs(_flat(mean) - expected).max() < 1e-5


def test_integer_buffers_are_refused_or_kept_at_the_global_value():
    glob, deltas = _deltas(3, seed=6, bn=True)
    ctx = RoundContext(1, 0, 0, (0, 1, 2))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        SecAggTransform(clip=1.0).encode(deltas[0], ctx)
    t = SecAggTransform(clip=10.0, frac_bits=20, integer_buffers="keep")
    mean = _run(t, glob, deltas, [0, 1, 2])
    assert torch.equal(mean["1.num_batches_tracked"], glob["1.num_batches_tracked"])
    assert torch.allclose(
        mean["1.running_mean"], sum(d["1.running_mean"] for d in deltas) / 3, atol=1e-5
    )


def test_encode_needs_the_cohort_and_refuses_bad_settings():
    _, deltas = _deltas(2)
    with pytest.raises(ValueError, match="cohort"):
        SecAggTransform(clip=1.0).encode(deltas[0], RoundContext(1, 0, 0, ()))
    with pytest.raises(ValueError, match="threshold"):
        SecAggTransform(clip=1.0, threshold=0.5)
    with pytest.raises(ValueError, match="dropouts"):
        SecAggTransform(clip=1.0, dropouts={"later": 0.1})
    with pytest.raises(ValueError, match="wrap around"):
        SecAggTransform(clip=1.0, frac_bits=31, bits=32)
    with pytest.raises(ValueError, match="must come last"):
        Pipeline([SecAggTransform(clip=1.0), SecAggTransform(clip=1.0)])


def _federation(num_clients: int = 5, seed: int = 0):
    from labsupport.fl.clients import DataClient

    g = torch.Generator().manual_seed(seed)
    clients = []
    for _ in range(num_clients):
        x = torch.randn(24, 6, generator=g)
        clients.append(DataClient(x, (x[:, 0] > 0).long()))
    return clients


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def test_fedavg_with_secure_aggregation_matches_plain_fedavg():
    from labsupport.fl.server import FedAvgConfig, FedAvgSimulation

    clients = _federation()
    cfg = FedAvgConfig(num_rounds=1, fraction_train=1.0, local_epochs=1, batch_size=8, lr=0.1)
    counts = {i: c.num_samples for i, c in enumerate(clients)}
    plain = FedAvgSimulation(_model(), clients, None, cfg)
    plain.run(progress=False)
    masked = FedAvgSimulation(
        _model(),
        clients,
        None,
        cfg,
        transforms=[SecAggTransform(clip=1e3, frac_bits=24, client_weights=counts)],
    )
    masked.run(progress=False)
    for key, value in plain.global_state.items():
        assert torch.allclose(masked.global_state[key], value, atol=1e-5)
    assert masked.history.rounds[-1].bytes_up > 0


def test_fedavg_with_secure_aggregation_survives_a_rejected_client():
    from labsupport.fl.server import FedAvgConfig, FedAvgSimulation

    clients = _federation(6, seed=1)
    clients[2].y = clients[2].y.clone()
    clients[2].x = torch.full_like(clients[2].x, float("nan"))  # its update is NaN: rejected
    cfg = FedAvgConfig(num_rounds=1, fraction_train=1.0, local_epochs=1, batch_size=8, lr=0.1)
    transform = SecAggTransform(clip=10.0, frac_bits=24)
    sim = FedAvgSimulation(_model(), clients, None, cfg, transforms=[transform])
    record = sim.run_round()
    assert 2 in record.rejected
    assert transform.last_stats["dropped"] == [2]  # shares sent, masked input never came
    assert torch.isfinite(torch.cat([v.reshape(-1) for v in sim.global_state.values()])).all()
