"""FedAvgM and FedAdam against a numpy re-computation of Reddi et al. (2021), Algorithm 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.fl.aggregators import WeightedMean
from labsupport.fl.clients import FitReply
from labsupport.fl.server_opt import FedAdam, FedAvgM


def _round(glob, rng, n=4):
    replies, states, counts = [], [], []
    for i in range(n):
        w = glob["w"] + torch.from_numpy(rng.normal(size=(3,)).astype(np.float32))
        c = float(rng.integers(1, 20))
        replies.append(FitReply({"w": w, "t": torch.tensor(i + 1)}, c, {}, i))
        states.append(w.double().numpy())
        counts.append(c)
    mean = (np.array(states) * np.array(counts)[:, None]).sum(0) / sum(counts)
    return replies, mean


def test_fedavgm_without_momentum_is_fedavg():
    rng = np.random.default_rng(0)
    glob = {"w": torch.zeros(3), "t": torch.tensor(0)}
    replies, _ = _round(glob, rng)
    a = FedAvgM(server_lr=1.0, momentum=0.0).aggregate(glob, replies)
    b = WeightedMean().aggregate(glob, replies)
    torch.testing.assert_close(a["w"], b["w"])
    assert a["t"].item() == b["t"].item()


def test_fedavgm_and_fedadam_equal_numpy_over_three_rounds():
    rng = np.random.default_rng(1)
    lr, mom, b1, b2, tau = 0.5, 0.9, 0.9, 0.99, 1e-3
    avgm, adam = FedAvgM(lr, mom), FedAdam(lr, b1, b2, tau)
    g1 = {"w": torch.zeros(3), "t": torch.tensor(0)}
    g2 = {"w": torch.zeros(3), "t": torch.tensor(0)}
    x1 = np.zeros(3)
    x2 = np.zeros(3)
    v = m = s = np.zeros(3)
    first = True
    for _ in range(3):
        rep1, mean1 = _round(g1, rng)
        d1 = mean1 - x1
        v = d1 if first else mom * v + d1
        x1 = x1 + lr * v
        g1 = avgm.aggregate(g1, rep1)
        np.testing.assert_allclose(g1["w"].numpy(), x1, rtol=1e-5, atol=1e-6)
        rep2, mean2 = _round(g2, rng)
        d2 = mean2 - x2
        m = b1 * m + (1 - b1) * d2
        s = b2 * s + (1 - b2) * d2**2
        x2 = x2 + lr * m / (np.sqrt(s) + tau)
        g2 = adam.aggregate(g2, rep2)
        np.testing.assert_allclose(g2["w"].numpy(), x2, rtol=1e-5, atol=1e-6)
        first = False


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    glob = {"w": torch.zeros(3), "t": torch.tensor(0)}
    for cls in (lambda: FedAvgM(1.0, 0.5), lambda: FedAdam(0.1, bias_correction=True)):
        a = cls()
        r1, _ = _round(glob, rng)
        g = a.aggregate(glob, r1)
        state = a.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        b = cls()
        b.load_state_dict(state)
        r2, _ = _round(g, rng)
        torch.testing.assert_close(a.aggregate(g, r2)["w"], b.aggregate(g, r2)["w"])
        with pytest.raises(ValueError, match="unknown"):
            b.load_state_dict({"junk": torch.zeros(1)})


def test_bad_hyperparameters_are_refused():
    for bad in (
        lambda: FedAvgM(momentum=1.0),
        lambda: FedAdam(tau=0.0),
        lambda: FedAdam(beta1=-0.1),
    ):
        with pytest.raises(ValueError):
            bad()


def test_fedadam_state_survives_a_server_checkpoint(tmp_path):
    from labsupport.fl.clients import DataClient
    from labsupport.fl.server import FedAvgConfig, FedAvgSimulation

    gen = torch.Generator().manual_seed(0)
    clients = [
        DataClient(torch.randn(10, 3, generator=gen), torch.arange(10) % 2) for _ in range(2)
    ]
    cfg = FedAvgConfig(num_rounds=2, fraction_train=1.0, batch_size=5, lr=0.1)

    def make():
        torch.manual_seed(0)
        agg = FedAdam(0.05)
        sim = FedAvgSimulation(torch.nn.Linear(3, 2), clients, None, cfg, aggregator=agg,
                               checkpoint_dir=tmp_path)  # fmt: skip
        return sim, agg

    sim, agg = make()
    sim.run(progress=False)
    again, agg2 = make()
    assert again.round == 2 and agg2.steps == 2
    for k in agg.m:
        torch.testing.assert_close(agg2.m[k], agg.m[k])
        torch.testing.assert_close(agg2.v[k], agg.v[k])
