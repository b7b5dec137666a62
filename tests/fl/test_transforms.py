"""The update pipeline (labsupport.fl.transforms), and a toy secure aggregation through the server."""

from __future__ import annotations

import pytest
import torch

from labsupport.fl.aggregators import Aggregator, WeightedMean
from labsupport.fl.clients import DataClient, RoundContext
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.fl.state import aggregate
from labsupport.fl.transforms import Pipeline, RoundAborted, UpdateTransform
from labsupport.models import build_model

CTX = RoundContext(server_round=1, client_id=0, seed=0)


class Log(UpdateTransform):
    """Records the order in which stages run; encode adds ``add``, decode subtracts it."""

    def __init__(self, name, log, add=0.0):
        self.name, self.log, self.add = name, log, add

    def encode(self, delta, ctx):
        self.log.append(("encode", self.name))
        return {k: v + self.add for k, v in delta.items()}

    def decode(self, payload, ctx, global_state):
        self.log.append(("decode", self.name))
        return {k: v - self.add for k, v in payload.items()}

    def finalize(self, global_state, new_state, server_round):
        self.log.append(("finalize", self.name))
        return new_state

    def config(self):
        return {"name": "Log", "tag": self.name, "add": self.add}


def test_an_empty_pipeline_is_the_identity():
    p = Pipeline()
    assert not p and len(p) == 0 and not p.sums_payloads
    d = {"w": torch.arange(3.0)}
    assert torch.equal(p.encode(d, CTX)["w"], d["w"])
    assert torch.equal(p.decode(d, CTX, d)["w"], d["w"])
    assert p.config() == [] and p.state_dict() == []


def test_stages_encode_in_order_and_decode_and_finalize_in_reverse():
    log = []
    p = Pipeline([Log("a", log, 1.0), Log("b", log, 10.0)])
    d = {"w": torch.zeros(2)}
    payload = p.encode(d, CTX)
    assert payload["w"].tolist() == [11.0, 11.0]
    assert p.decode(payload, CTX, d)["w"].tolist() == [0.0, 0.0]
    p.finalize(d, d, 1)
    assert log == [
        ("encode", "a"),
        ("encode", "b"),
        ("decode", "b"),
        ("decode", "a"),
        ("finalize", "b"),
        ("finalize", "a"),
    ]
    assert p.config() == [
        {"name": "Log", "tag": "a", "add": 1.0},
        {"name": "Log", "tag": "b", "add": 10.0},
    ]
    assert repr(p.transforms[0]) == "Log(tag='a', add=1.0)"


def test_the_base_transform_keeps_no_state_and_refuses_state():
    t = UpdateTransform()
    assert t.state_dict() == {} and t.config() == {"name": "UpdateTransform"}
    t.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        t.load_state_dict({"x": 1})
    with pytest.raises(NotImplementedError):
        t.aggregate_payloads({}, {}, 1, {})
    with pytest.raises(ValueError, match="state for 2 transforms; this pipeline has 1"):
        Pipeline([t]).load_state_dict([{}, {}])


def test_a_pipeline_accepts_only_transforms():
    with pytest.raises(TypeError, match="transform 1 is a str"):
        Pipeline([UpdateTransform(), "topk"])


class Summing(UpdateTransform):
    sums_payloads = True


def test_a_summing_transform_must_come_last():
    assert Pipeline([UpdateTransform(), Summing()]).sums_payloads
    with pytest.raises(ValueError, match="must come last"):
        Pipeline([Summing(), UpdateTransform()])


# ------------------------------------------------------------------ toy secure aggregation
class ToyMasking(UpdateTransform):
    """Pairwise cancelling masks (Bonawitz et al. 2017, without the key agreement and dropouts).

    Client ``c`` sends ``n_c * delta_c + sum_{j in cohort, j != c} sign(c, j) * m_{min, max}``, with
    ``m`` a large pseudo-random vector shared by the pair: one payload alone looks like noise, the
    sum over the cohort has every mask once with + and once with -. Counts are known to the
    clients (pre-weighting is how a mask-based scheme gets a weighted mean).
    """

    sums_payloads = True

    def __init__(self, counts, scale=100.0):
        self.counts, self.scale = counts, scale
        self.seen = []

    def _mask(self, a, b, server_round, like):
        g = torch.Generator().manual_seed(hash((a, b, server_round)) % 2**31)
        return {
            k: self.scale * torch.randn(v.shape, generator=g, dtype=torch.float64)
            for k, v in like.items()
        }

    def encode(self, delta, ctx):
        out = {k: self.counts[ctx.client_id] * v.double() for k, v in delta.items()}
        for j in ctx.cohort:
            if j == ctx.client_id:
                continue
            a, b = min(j, ctx.client_id), max(j, ctx.client_id)
            sign = 1.0 if ctx.client_id == a else -1.0
            for k, m in self._mask(a, b, ctx.server_round, delta).items():
                out[k] = out[k] + sign * m
        return out

    def aggregate_payloads(self, payloads, weights, server_round, global_state):
        self.seen.append((sorted(payloads), dict(weights)))
        total = sum(float(weights[c]) for c in payloads)
        keys = next(iter(payloads.values())).keys()
        return {
            k: (sum(p[k] for p in payloads.values()) / total).to(global_state[k].dtype)
            for k in keys
        }


def _federation(sizes=(10, 30, 20)):
    g = torch.Generator().manual_seed(0)
    clients = []
    for n in sizes:
        x = torch.randn(n, 40, generator=g)
        clients.append(DataClient(x, x[:, :10].argmax(1)))
    return clients


def test_a_toy_secure_aggregation_gives_the_plain_weighted_mean():
    clients = _federation()
    cfg = FedAvgConfig(num_rounds=2, fraction_train=1.0, batch_size=5, lr=0.1)
    plain = FedAvgSimulation(build_model("mlp", seed=0), clients, None, cfg)
    masking = ToyMasking({i: c.num_samples for i, c in enumerate(clients)})
    masked = FedAvgSimulation(build_model("mlp", seed=0), clients, None, cfg, transforms=[masking])
    for _ in range(2):
        plain_record, masked_record = plain.run_round(), masked.run_round()
        assert masked_record.rejected == {}
        for k, v in plain.global_state.items():
            torch.testing.assert_close(masked.global_state[k], v, rtol=1e-5, atol=1e-6)
        assert masked_record.train_loss == pytest.approx(plain_record.train_loss)
    assert masking.seen[0] == ([0, 1, 2], {0: 10.0, 1: 30.0, 2: 20.0})


def test_a_masked_payload_alone_reveals_nothing_like_the_update():
    masking = ToyMasking({0: 1, 1: 1})
    delta = {"w": torch.full((1000,), 0.01)}
    ctx = RoundContext(1, 0, 0, cohort=(0, 1))
    payload = masking.encode(delta, ctx)["w"]
    assert float(payload.std()) > 50  # the mask, not the 0.01 update
    other = masking.encode(delta, RoundContext(1, 1, 0, cohort=(0, 1)))["w"]
    torch.testing.assert_close((payload + other) / 2, delta["w"].double(), rtol=0, atol=1e-12)


def test_only_the_weighted_mean_may_aggregate_summed_payloads():
    class Median(Aggregator):
        def aggregate(self, global_state, replies):
            return aggregate([r.state for r in replies], [1.0] * len(replies))

    class MyMean(WeightedMean):
        pass

    clients = _federation()
    for aggregator in (Median(), MyMean()):
        with pytest.raises(ValueError, match="use WeightedMean"):
            FedAvgSimulation(
                build_model("mlp", seed=0),
                clients,
                None,
                aggregator=aggregator,
                transforms=[ToyMasking({0: 1, 1: 1, 2: 1})],
            )


class Aborting(UpdateTransform):
    """A summing stage that cannot decode this round (too few survivors, say)."""

    sums_payloads = True

    def aggregate_payloads(self, payloads, weights, server_round, global_state):
        raise RoundAborted("only 1 of 3 clients survived; the threshold is 2")


def test_an_aborted_secure_round_keeps_the_global_model_and_says_why():
    model = build_model("logistic", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FedAvgConfig(num_rounds=2, fraction_train=1.0, local_epochs=1, batch_size=5, lr=0.1)
    sim = FedAvgSimulation(model, _federation(), None, cfg, transforms=[Aborting()])
    history = sim.run(progress=False)
    assert len(history) == 2
    assert all("threshold is 2" in r.extra["aborted"] for r in history.rounds)
    for k, v in before.items():
        assert torch.equal(sim.global_state[k], v)
