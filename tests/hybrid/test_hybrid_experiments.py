"""labsupport.hybrid.experiments.routing_overhead on a tiny PyTorch edge (the ONNX pair is covered by
notebook 05 and the ``hybrid`` benchmark)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from labsupport.hybrid import experiments as ex


def test_routing_overhead_times_three_routers_in_their_own_loops():
    torch.manual_seed(0)
    edge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10)).eval()
    pair = SimpleNamespace(edge=edge, x_test=torch.randn(50, 1, 40))  # fewer inputs than a batch
    out = ex.routing_overhead(pair, temperature=1.5, threshold=0.6, batches=(1, 64), repeats=40)
    assert [r["batch"] for r in out["rows"]] == [1, 64, 256]  # the headline batch is added
    for row in out["rows"]:
        for name in ("routing", "numpy_routing", "torch_routing"):
            assert row[f"{name}_us"] > 0
        assert row["ratio"] > 0 and row["numpy_ratio"] > 0 and row["torch_ratio"] > 0
        assert row["edge_us"] > 0
    head = out["rows"][-1]
    assert out["batch"] == 256 and out["ratio"] == head["ratio"]
    assert out["routing_ms"] == head["routing_us"] / 1e3 and out["runtime"] == "Sequential"
