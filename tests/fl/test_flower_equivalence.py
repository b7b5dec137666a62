"""Our robust aggregators equal Flower 1.42's strategies on the same updates.

Flower's ``FedMedian``, ``FedTrimmedAvg``, ``Krum`` and ``MultiKrum`` (``flwr.serverapp.strategy``) are
called through ``aggregate_train`` on hand-built reply Messages (fresh ones per call: some strategies
pop the arrays they read). Flower aggregates weights; ours aggregates deltas around a global model and
adds them back -- the same result up to float32 rounding. Krum is compared on well-separated updates:
Flower's float32 ``|x|^2 + |y|^2 - 2 x.y`` distances can rank near-ties differently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402

from labsupport.fl.clients import FitReply  # noqa: E402
from labsupport.fl.robust import Krum as OurKrum  # noqa: E402
from labsupport.fl.robust import Median, TrimmedMean  # noqa: E402
from labsupport.fl.robust import MultiKrum as OurMultiKrum  # noqa: E402

KEYS = ("fc.weight", "fc.bias")


def _messages(states: list[dict[str, np.ndarray]], counts: list[int]) -> list[Message]:
    out = []
    for i, (state, n) in enumerate(zip(states, counts, strict=True)):
        arrays = ArrayRecord({k: Array(np.array(v, dtype=np.float32)) for k, v in state.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
        meta = Metadata(
            run_id=1,
            message_id=f"m{i}",
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id=str(i),
            group_id="1",
            created_at=0.0,
            ttl=3600.0,
            message_type="train",
        )
        out.append(Message(content=content, metadata=meta))
    return out


def _case(n: int, seed: int, spread: float = 1.0, separated: bool = False):
    rng = np.random.default_rng(seed)
    glob = {"fc.weight": rng.normal(size=(3, 4)), "fc.bias": rng.normal(size=3)}
    states = []
    for i in range(n):
        # well separated: client i sits at distance ~ (i + 1)^2 from the rest
        scale = spread * (1 + (i**2 if separated else 0))
        states.append({k: v + rng.normal(size=v.shape) * scale for k, v in glob.items()})
    counts = [int(c) for c in rng.integers(1, 50, size=n)]
    return glob, states, counts


def _ours(agg, glob, states, counts):
    g = {k: torch.tensor(v, dtype=torch.float32) for k, v in glob.items()}
    replies = [
        FitReply({k: torch.tensor(s[k], dtype=torch.float32) for k in KEYS}, float(c), {}, i)
        for i, (s, c) in enumerate(zip(states, counts, strict=True))
    ]
    return agg.aggregate(g, replies)


def _flower(strategy, states, counts):
    arrays, _ = strategy.aggregate_train(1, _messages(states, counts))
    return {k: arrays[k].numpy() for k in KEYS}


def _assert_close(ours, theirs, atol=2e-5):
    for k in KEYS:
        np.testing.assert_allclose(ours[k].numpy(), theirs[k], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (5, 2), (8, 3), (11, 4)])
def test_median_equals_flower_fedmedian(n, seed):
    glob, states, counts = _case(n, seed)
    _assert_close(_ours(Median(), glob, states, counts), _flower(FedMedian(), states, counts))


@pytest.mark.parametrize("n,beta", [(3, 0.1), (5, 0.2), (10, 0.1), (10, 0.3), (9, 0.45)])
def test_trimmed_mean_equals_flower_fedtrimmedavg(n, beta):
    glob, states, counts = _case(n, n)
    ours = _ours(TrimmedMean(beta), glob, states, counts)
    _assert_close(ours, _flower(FedTrimmedAvg(beta=beta), states, counts))


@pytest.mark.parametrize("n,f", [(4, 0), (6, 1), (9, 2), (12, 3)])
def test_krum_equals_flower_krum_on_well_separated_updates(n, f):
    glob, states, counts = _case(n, 10 + n, spread=0.1, separated=True)
    ours = _ours(OurKrum(num_malicious=f), glob, states, counts)
    _assert_close(ours, _flower(Krum(num_malicious_nodes=f), states, counts))


@pytest.mark.parametrize("n,f,m", [(5, 1, 2), (8, 2, 3), (12, 3, 6)])
def test_multikrum_equals_flower_multikrum_on_well_separated_updates(n, f, m):
    glob, states, counts = _case(n, 20 + n, spread=0.1, separated=True)
    ours = _ours(OurMultiKrum(num_malicious=f, num_selected=m), glob, states, counts)
    theirs = _flower(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), states, counts)
    _assert_close(ours, theirs)
