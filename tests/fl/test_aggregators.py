"""Aggregators (labsupport.fl.aggregators): the weighted mean, the base class, the count policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labsupport.fl.aggregators import Aggregator, CountPolicy, WeightedMean
from labsupport.fl.clients import FitReply


def _replies(counts=(10, 30, 60), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        FitReply({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}, n, {}, i)
        for i, n in enumerate(counts)
    ]


def test_weighted_mean_is_fedavg_against_numpy():
    replies = _replies()
    out = WeightedMean().aggregate({}, replies)
    w = np.array([10, 30, 60]) / 100
    for key in ("w", "b"):
        expected = np.tensordot(w, np.stack([r.state[key].double().numpy() for r in replies]), 1)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert out[key].dtype == torch.float32


def test_weighted_mean_of_one_reply_is_that_reply():
    (reply,) = _replies(counts=(7,))
    out = WeightedMean().aggregate({}, [reply])
    assert all(torch.equal(out[k], reply.state[k]) for k in reply.state)


def test_base_aggregator_defaults():
    a = Aggregator()
    with pytest.raises(NotImplementedError):
        a.aggregate({}, [])
    assert a.instructions(1, {}) == {} and a.state_dict() == {}
    assert a.config() == {"name": "Aggregator"} and WeightedMean().config() == {
        "name": "WeightedMean"
    }
    a.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        a.load_state_dict({"momentum": torch.zeros(1)})
    assert repr(WeightedMean()) == "WeightedMean()"


def test_count_policy_weights():
    assert CountPolicy().weight(0, 1e6) == 1e6
    cap = CountPolicy("cap", cap=100)
    assert cap.weight(0, 1e6) == 100.0 and cap.weight(0, 30) == 30
    reg = CountPolicy("registered", registered={0: 20, 1: 40})
    assert reg.weight(0, 1e6) == 20.0 and reg.weight(1, 1) == 40.0  # under-claims get it too
    with pytest.raises(ValueError, match="client 2 has no registered sample count"):
        reg.weight(2, 10)


def test_count_policy_config_is_json_with_string_keys():
    import json

    reg = CountPolicy("registered", registered={10: 2, 1: 4})
    assert reg.config() == {"mode": "registered", "cap": None, "registered": {"1": 4, "10": 2}}
    assert json.loads(json.dumps(reg.config())) == reg.config()
    assert CountPolicy("cap", cap=5).config() != CountPolicy("cap", cap=6).config()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "trust"}, "mode must be"),
        ({"mode": "cap"}, "cap > 0"),
        ({"mode": "cap", "cap": 0}, "cap > 0"),
        ({"mode": "cap", "cap": -5}, "cap > 0"),
        ({"mode": "registered"}, "registered counts"),
    ],
)
def test_bad_count_policies_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CountPolicy(**kwargs)
