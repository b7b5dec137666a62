"""Checkpoints without pickle (labsupport.fl.checkpoint) and the server's resume, attacked."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import pytest
import torch

from labsupport.fl.aggregators import Aggregator, CountPolicy, WeightedMean
from labsupport.fl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from labsupport.fl.clients import DataClient
from labsupport.fl.compression import TopK
from labsupport.fl.server import CHECKPOINT_NAME, FedAvgConfig, FedAvgSimulation
from labsupport.fl.state import aggregate
from labsupport.models import build_model


def _tree():
    return {
        "round": 3,
        "global_state": {"w": torch.randn(3, 2), "n": torch.tensor(5), "h": torch.ones(2).half()},
        "history": [{"round": 1, "accuracy": None, "rejected": {"2": "nan"}}],
        "nested": [{"t": torch.arange(4)}, 1.5, "text", True, None],
        7: "an int key",
    }


def _same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_tree_of_tensors_and_json_values_round_trips(tmp_path):
    tree = _tree()
    save_checkpoint(tmp_path / "sub" / "c.safetensors", tree)
    back = load_checkpoint(tmp_path / "sub" / "c.safetensors")
    tree["7"] = tree.pop(7)  # keys become strings, as in JSON
    assert _same_tree(back, tree)
    assert not (tmp_path / "sub" / "c.safetensors.tmp").exists()


def test_a_checkpoint_is_safetensors_and_json_with_no_pickle_and_no_zip(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _tree())
    data = path.read_bytes()
    assert not zipfile.is_zipfile(path) and not data.startswith(b"PK")
    assert data[:1] != b"\x80"  # every pickle protocol >= 2 starts with the PROTO opcode
    # the whole file is accounted for: an 8-byte length, a JSON header, and the raw tensor bytes
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert len(data) == 8 + n + max(ends)
    assert sum(
        e - s
        for e, s in (v["data_offsets"][::-1] for k, v in header.items() if k != "__metadata__")
    ) == max(ends)


@pytest.mark.parametrize(
    ("tree", "error", "message"),
    [
        ({"f": lambda: 0}, TypeError, "expected tensors, dicts, lists and JSON values"),
        ({"o": object()}, TypeError, "/o is a object"),
        ({(1, 2): 3}, TypeError, "must be a str or int"),
        ({"a": {"__tensor__": "0"}}, ValueError, "reserved"),
    ],
)
def test_what_cannot_be_saved_without_pickle_is_refused(tmp_path, tree, error, message):
    with pytest.raises(error, match=message):
        save_checkpoint(tmp_path / "c", tree)


class Boom:
    """Unpickling this would run code: it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_or_torch_save_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"round": Boom(marker)}))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(evil)
    torch.save({"round": 3, "global_state": {"w": torch.ones(2)}, "x": Boom(marker)}, evil)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_a_missing_truncated_or_altered_checkpoint_gives_a_checkpoint_error(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)
    save_checkpoint(path, _tree())
    data = path.read_bytes()
    for altered in (
        data[: len(data) // 2],
        data[:-1],
        data[:100] + bytes([data[100] ^ 1]) + data[101:],
    ):
        path.write_bytes(altered)
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(path)


def test_a_payload_that_is_not_a_checkpoint_is_refused(tmp_path):
    from labsupport.fl.serialize import serialize

    path = tmp_path / "c.safetensors"
    path.write_bytes(serialize({"w": torch.ones(2)}, metadata={"format": "other"}))
    with pytest.raises(CheckpointError, match="not a labsupport checkpoint"):
        load_checkpoint(path)
    path.write_bytes(
        serialize({}, metadata={"format": "labsupport-checkpoint/1", "tree": {"__tensor__": "9"}})
    )
    with pytest.raises(CheckpointError, match="does not hold"):
        load_checkpoint(path)
    path.write_bytes(serialize({}, metadata={"format": "labsupport-checkpoint/1", "tree": [1]}))
    with pytest.raises(CheckpointError, match="no tree"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ resume
def _clients(num=4, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num * n + 50, 40, generator=g)
    y = (x[:, :10].argmax(1)).long()
    return [DataClient(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(num)], (
        x[-50:],
        y[-50:],
    )


CFG = FedAvgConfig(num_rounds=4, fraction_train=0.5, batch_size=10, lr=0.1, seed=2)


class ServerMomentum(Aggregator):
    """FedAvgM (Hsu et al. 2019): v <- beta v + (mean - w); w <- w + v. State: v."""

    def __init__(self, beta=0.9):
        self.beta = beta
        self.velocity = {}

    def aggregate(self, global_state, replies):
        mean = aggregate([r.state for r in replies], [r.num_samples for r in replies])
        for k, g in global_state.items():
            v = self.velocity.get(k, torch.zeros_like(g))
            self.velocity[k] = self.beta * v + (mean[k] - g)
        return {k: g + self.velocity[k] for k, g in global_state.items()}

    def config(self):
        return {"name": "ServerMomentum", "beta": self.beta}

    def state_dict(self):
        return {"velocity": {k: v.clone() for k, v in self.velocity.items()}}

    def load_state_dict(self, state):
        self.velocity = {k: v.clone() for k, v in state["velocity"].items()}


def _sim(tmp_path=None, *, aggregator=None, transforms=(), policy=None, resume=True, clients=None):
    clients_, test = _clients()
    return FedAvgSimulation(
        build_model("mlp", seed=0),
        clients or clients_,
        test,
        CFG,
        aggregator=aggregator,
        transforms=list(transforms),
        count_policy=policy,
        checkpoint_dir=tmp_path,
        resume=resume,
    )


def test_resume_is_exact_with_a_stateful_transform_and_a_stateful_aggregator(tmp_path):
    straight = _sim(aggregator=ServerMomentum(), transforms=[TopK(0.1)])
    straight.run(progress=False)
    first = _sim(tmp_path, aggregator=ServerMomentum(), transforms=[TopK(0.1)])
    first.run(2, progress=False)
    resumed_topk, resumed_momentum = TopK(0.1), ServerMomentum()
    resumed = _sim(tmp_path, aggregator=resumed_momentum, transforms=[resumed_topk])
    assert resumed.round == 2 and resumed_topk.residuals and resumed_momentum.velocity
    for c, r in first.pipeline.transforms[0].residuals.items():
        assert all(torch.equal(resumed_topk.residuals[c][k], v) for k, v in r.items())
    resumed.run(progress=False)
    assert all(torch.equal(resumed.global_state[k], v) for k, v in straight.global_state.items())
    assert resumed.history.column("bytes_up") == straight.history.column("bytes_up")
    assert resumed.history.column("accuracy") == straight.history.column("accuracy")
    # and the state mattered: without it (a fresh TopK and momentum at round 2) the run differs
    fresh = _sim(tmp_path / "other", aggregator=ServerMomentum(), transforms=[TopK(0.1)])
    fresh.run(2, progress=False)
    fresh.pipeline.transforms[0].reset()
    fresh.aggregator.velocity = {}
    fresh.run(progress=False)
    assert not all(torch.equal(fresh.global_state[k], v) for k, v in straight.global_state.items())


@pytest.mark.parametrize(
    ("first", "second", "what"),
    [
        ({"aggregator": ServerMomentum(0.9)}, {"aggregator": ServerMomentum(0.5)}, "aggregator"),
        ({"aggregator": ServerMomentum(0.9)}, {}, "aggregator"),
        ({"transforms": [TopK(0.1)]}, {"transforms": [TopK(0.2)]}, "transforms"),
        (
            {"transforms": [TopK(0.1)]},
            {"transforms": [TopK(0.1, error_feedback=False)]},
            "transforms",
        ),
        ({}, {"policy": CountPolicy("cap", cap=10)}, "count_policy"),
        (
            {"policy": CountPolicy("cap", cap=10)},
            {"policy": CountPolicy("cap", cap=20)},
            "count_policy",
        ),
    ],
)
def test_resuming_with_another_aggregator_transform_or_count_policy_is_refused(
    tmp_path, first, second, what
):
    _sim(tmp_path, **first).run_round()
    with pytest.raises(ValueError, match=f"different run.*{what}"):
        _sim(tmp_path, **second)
    assert _sim(tmp_path, **second, resume=False).round == 0


def test_a_corrupted_checkpoint_is_a_clear_error_and_resume_false_starts_fresh(tmp_path):
    sim = _sim(tmp_path)
    sim.run(2, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="resume=False"):
        _sim(tmp_path)
    fresh = _sim(tmp_path, resume=False)
    assert fresh.round == 0 and len(fresh.history) == 0
    fresh.run_round()
    assert load_checkpoint(path)["round"] == 1  # overwritten with a good one
    assert _sim(tmp_path).round == 1


def test_a_checkpoint_with_a_forged_global_state_is_refused(tmp_path):
    sim = _sim(tmp_path)
    sim.run_round()
    path = tmp_path / CHECKPOINT_NAME
    tree = load_checkpoint(path)
    tree["global_state"]["fc1.weight"] = torch.full((100, 40), float("nan"))
    save_checkpoint(path, tree)
    with pytest.raises(CheckpointError, match="inconsistent.*non-finite"):
        _sim(tmp_path)
    tree["global_state"]["fc1.weight"] = torch.zeros(3)
    save_checkpoint(path, tree)
    with pytest.raises(CheckpointError, match="inconsistent.*shape"):
        _sim(tmp_path)
    del tree["fingerprint"]
    save_checkpoint(path, tree)
    with pytest.raises(CheckpointError, match="cannot resume"):
        _sim(tmp_path)


def test_weighted_mean_resumes_with_an_empty_state(tmp_path):
    _sim(tmp_path, aggregator=WeightedMean()).run_round()
    assert _sim(tmp_path).round == 1  # the default aggregator is the same WeightedMean
