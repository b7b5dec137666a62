"""Hostile clients: each test is an attack a client could make on the FedAvg server or on gossip.

The reference for every attack is the same federation in which the attacker is simply rejected (it
raises before doing anything): whatever the attacker did to what it was handed, the global model --
and every honest client's model -- must come out bit for bit as in that run.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from labsupport.fl.aggregators import CountPolicy, WeightedMean
from labsupport.fl.clients import DataClient, FitReply, TrainConfig
from labsupport.fl.compression import NoCompression, StochasticQuantizer, TopKQuantized
from labsupport.fl.gossip import GossipSimulation
from labsupport.fl.graphs import fully_connected, mixing_matrix, ring
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.fl.state import aggregate, clone_state
from labsupport.fl.transforms import UpdateTransform
from labsupport.models import build_model

CFG = FedAvgConfig(num_rounds=2, fraction_train=1.0, batch_size=10, lr=0.1, seed=0)


def _clients(num=3, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num * n + 50, 40, generator=g)
    y = (x[:, :10].argmax(1)).long()
    clients = [DataClient(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(num)]
    return clients, (x[-50:], y[-50:])


def _same(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


class Rejected:
    """The reference attacker: raises before touching anything."""

    num_samples = 20

    def fit(self, model, global_state, ctx, config):
        raise RuntimeError("rejected")


class Attacker:
    """Runs ``attack(model, global_state, ctx)`` on what it was handed, then ``ending``."""

    num_samples = 20

    def __init__(self, attack, ending="raise"):
        self.attack, self.ending = attack, ending

    def fit(self, model, global_state, ctx, config):
        self.attack(model, global_state, ctx)
        if self.ending == "raise":
            raise RuntimeError("attacked, now failing")
        if self.ending == "nan":
            return FitReply({k: v * float("nan") for k, v in global_state.items()}, 20)
        return "garbage"


def _poison_state(model, global_state, ctx):
    for v in global_state.values():
        v.add_(100.0)


def _poison_weights(model, global_state, ctx):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e3)


def _rewire_model(model, global_state, ctx):
    # another layer, a hook that changes every output, frozen parameters: nothing load_state_dict undoes
    model.fc1 = nn.Linear(40, 100)
    model.register_forward_hook(lambda m, i, o: o * 0 + 7)
    for p in model.parameters():
        p.requires_grad_(False)


ATTACKS = {"state": _poison_state, "weights": _poison_weights, "rewire": _rewire_model}


def _fedavg(attacker, rounds=2, num=3, **kw):
    clients, test = _clients(num)
    sim = FedAvgSimulation(build_model("mlp", seed=0), [attacker, *clients], test, CFG, **kw)
    records = [sim.run_round() for _ in range(rounds)]
    return sim, records


@pytest.mark.parametrize("ending", ["raise", "nan", "garbage"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_what_a_client_does_to_its_copies_cannot_reach_the_server_or_other_clients(attack, ending):
    reference, _ = _fedavg(Rejected())
    sim, records = _fedavg(Attacker(ATTACKS[attack], ending))
    assert all(list(r.rejected) == [0] for r in records)
    assert _same(sim.global_state, reference.global_state)
    assert _same(sim.model.state_dict(), reference.model.state_dict())
    assert sim.history.column("accuracy") == reference.history.column("accuracy")


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_what_a_client_does_to_its_copies_cannot_reach_its_gossip_neighbours(attack):
    def run(attacker):
        clients, test = _clients(3)
        sim = GossipSimulation(
            build_model("mlp", seed=0),
            [attacker, *clients],
            test,
            mixing_matrix(ring(4)),
            TrainConfig(batch_size=10, lr=0.1),
        )
        for _ in range(2):
            record = sim.run_round()
            assert list(record.rejected) == [0]
        return sim

    reference, sim = run(Rejected()), run(Attacker(ATTACKS[attack]))
    for got, want in zip(sim.states, reference.states, strict=True):
        assert _same(got, want)


def _hostile_hook_client(clients):
    """A DataClient (the plain type, no subclass) whose loss_fn rewires the model it trains in."""
    c = clients[0]

    def loss_fn(model, xb, yb):
        _rewire_model(model, None, None)
        raise RuntimeError("hook attacked, now failing")

    return DataClient(c.x, c.y, loss_fn=loss_fn)


@pytest.mark.parametrize("where", ["fedavg", "gossip"])
def test_a_hook_of_a_data_client_cannot_rewire_the_model_the_next_clients_train_in(where):
    # seen: every later honest client is rejected ("element 0 of tensors does not require grad")
    clients, test = _clients(3)
    if where == "fedavg":
        reference, _ = _fedavg(Rejected())
        sim, records = _fedavg(_hostile_hook_client(clients))
        assert all(list(r.rejected) == [0] for r in records)
        assert _same(sim.global_state, reference.global_state)
        return

    def run(attacker):
        sim = GossipSimulation(
            build_model("mlp", seed=0),
            [attacker, *clients],
            test,
            mixing_matrix(ring(4)),
            TrainConfig(batch_size=10, lr=0.1),
        )
        assert list(sim.run_round().rejected) == [0]
        return sim

    reference, sim = run(Rejected()), run(_hostile_hook_client(clients))
    assert all(_same(a, b) for a, b in zip(sim.states, reference.states, strict=True))


def _instructing(tensor_too: bool):
    class Instructing(WeightedMean):
        """An aggregator that sends every client a number and (optionally) its own state tensor."""

        def __init__(self):
            self.control = torch.zeros(3)

        def instructions(self, server_round, global_state):
            out = {"scale": 1.0}
            if tensor_too:
                out["control"] = self.control
            return out

    return Instructing()


class InstructionsAttacker:
    num_samples = 20

    def fit(self, model, global_state, ctx, config):
        ctx.instructions["scale"] = 1e6  # a mapping handed to every client of the round
        if "control" in ctx.instructions:
            ctx.instructions["control"].add_(5.0)
        raise RuntimeError("attacked")


class InstructionsReader:
    """An honest client whose update depends on the instructions (as FedProx's mu would)."""

    num_samples = 20

    def fit(self, model, global_state, ctx, config):
        scale = float(ctx.instructions["scale"])
        return FitReply({k: v + 1e-3 * scale for k, v in global_state.items()}, 20)


@pytest.mark.parametrize("tensor_too", [False, True])
def test_a_client_cannot_change_the_instructions_other_clients_or_the_aggregator_see(tensor_too):
    def run(first):
        aggregator = _instructing(tensor_too)
        sim = FedAvgSimulation(
            build_model("logistic", seed=0),
            [first, InstructionsReader(), InstructionsReader()],
            None,
            CFG,
            aggregator=aggregator,
        )
        sim.run_round()
        return sim, aggregator

    (reference, _), (sim, aggregator) = run(Rejected()), run(InstructionsAttacker())
    assert _same(sim.global_state, reference.global_state)
    assert torch.equal(aggregator.control, torch.zeros(3))


# ----------------------------------------------------------------------- live state dicts
class Keeper:
    """Returns the *live* state_dict() of a model it keeps (shared with an accomplice)."""

    num_samples = 20

    def __init__(self, model, live=True):
        self.model, self.live = model, live

    def fit(self, model, global_state, ctx, config):
        self.model.load_state_dict(global_state)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.01)
        state = self.model.state_dict()
        return FitReply(state if self.live else clone_state(state), 20)


class Accomplice:
    """Called after the keeper in the same round: changes the keeper's model, then replies honestly."""

    num_samples = 20

    def __init__(self, model):
        self.model = model

    def fit(self, model, global_state, ctx, config):
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(1e4)
        return FitReply(clone_state(global_state), 20)


def test_a_live_state_dict_changed_after_the_reply_cannot_change_what_was_aggregated():
    def run(live):
        shared = build_model("mlp", seed=1)
        clients, test = _clients(2)
        sim = FedAvgSimulation(
            build_model("mlp", seed=0),
            [Keeper(shared, live), Accomplice(shared), *clients],
            test,
            CFG,
        )
        record = sim.run_round()
        assert record.rejected == {}
        return sim

    assert _same(run(live=True).global_state, run(live=False).global_state)


def test_returning_live_parameters_with_grad_is_accepted_as_a_detached_copy():
    class LiveParams:
        num_samples = 20

        def fit(self, model, global_state, ctx, config):
            model.load_state_dict(global_state)
            return FitReply(dict(model.named_parameters()), 20)

    clients, test = _clients(2)
    sim = FedAvgSimulation(build_model("mlp", seed=0), [LiveParams(), *clients], test, CFG)
    start = clone_state(sim.global_state)
    assert sim.run_round().rejected == {}
    assert all(not v.requires_grad for v in sim.global_state.values())
    assert not _same(sim.global_state, start)


# ------------------------------------------------------------ updates transforms cannot carry
class Fixed:
    """Replies ``make(global_state)`` with ``num_samples`` samples and an optional loss."""

    def __init__(self, make, num_samples=20, loss=None):
        self.make, self.num_samples, self.loss = make, num_samples, loss

    def fit(self, model, global_state, ctx, config):
        metrics = {} if self.loss is None else {"loss": self.loss}
        return FitReply(self.make(global_state), self.num_samples, metrics)


def _extremes(g):
    """Finite float32 values whose range overflows float32: +-3e38, alternating."""
    out = {}
    for k, v in g.items():
        signs = torch.where(torch.arange(v.numel()) % 2 == 0, 1.0, -1.0).reshape(v.shape)
        out[k] = (3e38 * signs).to(v.dtype)
    return out


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: StochasticQuantizer(8, seed=1), id="quant8"),
        pytest.param(lambda: TopKQuantized(0.5, bits=8, seed=1), id="topk+quant8"),
    ],
)
def test_an_update_quantization_cannot_encode_rejects_that_client_and_the_round_goes_on(make):
    reference, _ = _fedavg(Rejected(), rounds=1, transforms=[make()])
    sim, (record,) = _fedavg(Fixed(_extremes), rounds=1, transforms=[make()])
    assert list(record.rejected) == [0] and "overflows float32" in record.rejected[0]
    assert _same(sim.global_state, reference.global_state)


class Tamper(UpdateTransform):
    """A tampering stage: rewrites client 0's payload on its way out; decodes as the identity."""

    def __init__(self, how):
        self.how = how

    def encode(self, delta, ctx):
        payload = dict(delta)
        if ctx.client_id == 0:
            self.how(payload)
        return payload


def _truncate(p):
    key = next(k for k in p if p[k].numel() > 1)
    p[key] = p[key].reshape(-1)[:-1]


def _reshape(p):
    key = next(k for k in p if p[k].dim() == 2)
    p[key] = p[key].t().contiguous()


def _nan(p):
    key = next(iter(p))
    p[key] = p[key].clone()
    p[key].reshape(-1)[0] = float("nan")


def _drop(p):
    del p[next(iter(p))]


def _add(p):
    p["evil/dense"] = torch.zeros(3)


TAMPERING = {
    "truncated": (_truncate, "shape"),
    "transposed": (_reshape, "shape"),
    "nan": (_nan, "non-finite"),
    "missing": (_drop, "missing"),
    "extra": (_add, "unexpected"),
}


@pytest.mark.parametrize("compressed", [True, False], ids=["NoCompression", "identity"])
@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_a_tampered_payload_rejects_that_client_with_a_reason(kind, compressed):
    how, reason = TAMPERING[kind]
    if not compressed and kind == "extra":
        reason = "unexpected"
    first = [NoCompression()] if compressed else []
    reference, _ = _fedavg(Rejected(), rounds=1, transforms=[*first, Tamper(how)])
    sim, (record,) = _fedavg(Fixed(clone_state), rounds=1, transforms=[*first, Tamper(how)])
    assert list(record.rejected) == [0] and reason in record.rejected[0], record.rejected
    assert _same(sim.global_state, reference.global_state)


# ------------------------------------------------------------- extreme but finite numbers
class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6, dtype=dtype))

    def forward(self, x):
        return x[:, :10] + self.w.sum()


def _const(values, dtype=torch.float32):
    return lambda g: {"w": torch.tensor(values, dtype=dtype)}


def _exact_mean(states, counts, key="w"):
    """sum_k n_k x_k / sum_k n_k per entry, in exact rational arithmetic."""
    n = sum(Fraction(c) for c in counts)
    cols = zip(*[s[key].double().tolist() for s in states], strict=True)
    return [
        float(
            sum((Fraction(c) * Fraction(v) for c, v in zip(counts, col, strict=True)), Fraction(0))
            / n
        )
        for col in cols
    ]


@pytest.mark.parametrize(
    ("counts", "dtype"),
    [
        ((1e308, 1e-300, 20), torch.float32),
        ((1e308, 1e308, 1e308), torch.float32),
        ((1e-300, 1e-300, 3e-300), torch.float32),
        ((1e308, 1e-300, 20), torch.float64),
        ((1.7e308, 1.7e308, 1), torch.float64),
    ],
)
def test_extreme_counts_and_values_aggregate_exactly_or_are_rejected_never_overflow(counts, dtype):
    big = 3e38 if dtype == torch.float32 else 1.7e308
    values = [
        [big, -big, 1.0, 0.0, 1e-30, -2.5],
        [big, big, -1.0, 1e-45 if dtype == torch.float32 else 5e-324, 0.0, 7.0],
        [-big, big, 3.0, 0.0, -1e-30, 1.0],
    ]
    clients = [Fixed(_const(v, dtype), num_samples=n) for v, n in zip(values, counts, strict=True)]
    sim = FedAvgSimulation(Tiny(dtype), clients, None, CFG)
    record = sim.run_round()
    got = sim.global_state["w"]
    assert bool(torch.isfinite(got).all())
    if record.rejected:  # allowed, with a reason, as long as the rest is right
        assert all(record.rejected.values())
    kept = [i for i in range(3) if i not in record.rejected]
    states = [{"w": torch.tensor(values[i], dtype=torch.float64)} for i in kept]
    expected = torch.tensor(_exact_mean(states, [counts[i] for i in kept]), dtype=torch.float64)
    # the exact mean rounded once to the model's dtype, up to float64 rounding of the weights
    torch.testing.assert_close(got.double(), expected.to(dtype).double(), rtol=1e-12, atol=0)


def test_a_huge_sample_count_cannot_make_the_round_train_loss_overflow():
    clients = [
        Fixed(_const([0.0] * 6), num_samples=1e308, loss=2.0),
        Fixed(_const([0.0] * 6), num_samples=1e308, loss=3.0),
    ]
    record = FedAvgSimulation(Tiny(), clients, None, CFG).run_round()
    assert math.isfinite(record.train_loss) and record.train_loss == pytest.approx(2.5)


# -------------------------------------------------------------------- sample counts are claims
def _liar_run(policy, claim=1e6):
    poison = lambda g: {k: v + 5.0 for k, v in g.items()}  # noqa: E731
    clients, test = _clients(4)
    sim = FedAvgSimulation(
        build_model("mlp", seed=0),
        [*clients, Fixed(poison, num_samples=claim)],
        test,
        CFG,
        count_policy=policy,
    )
    start = clone_state(sim.global_state)
    record = sim.run_round()
    return sim, record, poison(start)


def test_a_client_claiming_a_million_samples_takes_over_plain_fedavg():
    sim, record, poison = _liar_run(None)
    honest, _, _ = _liar_run(None, claim=20)
    assert record.rejected == {}
    # weight 1e6 / (1e6 + 80): the global model is the liar's to within 80 / 1e6 of the distance
    for k, v in poison.items():
        gap = float((honest.global_state[k] - v).abs().max())
        assert float((sim.global_state[k] - v).abs().max()) <= 1e-4 * gap + 1e-6
        assert gap > 0.5


@pytest.mark.parametrize(
    "policy",
    [
        CountPolicy("cap", cap=20),
        CountPolicy("registered", registered={0: 20, 1: 20, 2: 20, 3: 20, 4: 20}),
    ],
    ids=["cap", "registered"],
)
def test_a_count_policy_stops_the_liar(policy):
    sim, record, _ = _liar_run(policy)
    honest, _, _ = _liar_run(None, claim=20)
    assert _same(sim.global_state, honest.global_state)
    assert record.extra["reweighted"] == {"4": [1e6, 20.0]}


def test_a_client_missing_from_the_registered_counts_is_rejected():
    policy = CountPolicy("registered", registered={0: 20, 1: 20, 2: 20, 3: 20})
    _, record, _ = _liar_run(policy)
    assert list(record.rejected) == [4] and "no registered sample count" in record.rejected[4]


# ---------------------------------------------------------------------- integer buffers
INT64 = [2**62 + 1, -(2**63), 2**63 - 1, -1, 0, 2**53 + 1]
INT_CASES = [
    pytest.param([[2**62 + 1, -(2**63)], [2**63 - 1, -(2**63)]], [1, 1], id="two-equal"),
    pytest.param([[2**62 + 1, -(2**63)], [2**63 - 1, 5]], [3, 1], id="three-to-one"),
    pytest.param(
        [[2**62 + 1, 3]] * 3,
        [1, 1, 1],
        id="three-identical",
    ),
    pytest.param(
        [INT64[:2], INT64[2:4], INT64[4:]],
        [10, 30, 60],
        id="mix-10-30-60",
    ),
    pytest.param(
        [[-(2**63), 2**63 - 1]] * 10,
        [1] * 10,
        id="ten-extremes",
    ),
]


def _rounded_exact(values, counts):
    n = sum(counts)
    return [
        round(Fraction(sum(c * v for c, v in zip(counts, col, strict=True)), n))  # half to even
        for col in zip(*values, strict=True)
    ]


@pytest.mark.parametrize(("values", "counts"), INT_CASES)
def test_int64_buffers_aggregate_exactly(values, counts):
    states = [{"n": torch.tensor(v, dtype=torch.int64)} for v in values]
    out = aggregate(states, counts)["n"]
    assert out.dtype == torch.int64 and out.tolist() == _rounded_exact(values, counts)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("n", torch.zeros(2, dtype=torch.int64))

    def forward(self, x):
        return x[:, :10] + self.w.sum()


@pytest.mark.parametrize(("values", "counts"), INT_CASES)
def test_int64_buffers_aggregate_exactly_through_the_server(values, counts):
    clients = [
        Fixed(lambda g, v=v: {"w": g["w"].clone(), "n": torch.tensor(v)}, num_samples=c)
        for v, c in zip(values, counts, strict=True)
    ]
    sim = FedAvgSimulation(Counter(), clients, None, CFG)
    record = sim.run_round()
    assert record.rejected == {}
    assert sim.global_state["n"].tolist() == _rounded_exact(values, counts)


def test_int64_extremes_are_carried_exactly_through_gossip_with_the_exact_average():
    states = [{"n": torch.tensor([2**62 + 1, -(2**63)])} for _ in range(2)]
    from labsupport.fl.gossip import gossip_average

    out = gossip_average(states, mixing_matrix(fully_connected(2)))
    assert all(s["n"].tolist() == [2**62 + 1, -(2**63)] for s in out)
    assert np.iinfo(np.int64).min == -(2**63)


@pytest.mark.parametrize(
    ("make", "dtype", "values"),
    [
        (NoCompression, torch.float64, [1.7e308, -1.7e308, 1.0, 0.0, 5e-324, -2.0]),
        (NoCompression, torch.float32, [3.4e38, -3.4e38, 1.0, 0.0, 1e-45, -2.0]),
        (lambda: StochasticQuantizer(8, seed=0), torch.float32, [3.3e38, 3.4028234e38] * 3),
        (lambda: TopKQuantized(1.0, seed=0), torch.float32, [3.3e38, 3.4028234e38] * 3),
    ],
    ids=["dense-float64-max", "dense-float32-max", "quant8-near-max", "topk+quant8-near-max"],
)
def test_extreme_values_through_a_transform_aggregate_correctly_or_are_rejected(
    make, dtype, values
):
    honest = [0.5, -0.5, 0.25, 0.0, 1.0, 2.0]
    clients = [Fixed(_const(values, dtype)), Fixed(_const(honest, dtype))]
    sim = FedAvgSimulation(Tiny(dtype), clients, None, CFG, transforms=[make()])
    record = sim.run_round()
    got = sim.global_state["w"]
    assert bool(torch.isfinite(got).all())
    assert 1 not in record.rejected  # the honest client always gets through
    if 0 in record.rejected:
        assert record.rejected[0]  # with a reason
        torch.testing.assert_close(got, torch.tensor(honest, dtype=dtype), rtol=0.02, atol=0.02)
    else:
        states = [{"w": torch.tensor(v, dtype=torch.float64)} for v in (values, honest)]
        expected = torch.tensor(_exact_mean(states, [20, 20]), dtype=torch.float64)
        # lossy transforms: within one quantization step of the range, relative to the values
        torch.testing.assert_close(got.double(), expected, rtol=0.02, atol=1e-6)
