"""Vectorized local updates (torch.func) against the sequential ``local_update`` they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from vectorized_testlib import ATOL, assert_same_updates, make_data

from labsupport.fl.clients import DataClient, FitReply
from labsupport.fl.server import FedAvgConfig, FedAvgSimulation
from labsupport.fl.state import clone_state
from labsupport.fl.vectorized import batch_plan, vectorized_local_updates
from labsupport.models import build_model
from labsupport.train import batch_indices

CASES = {
    "equal_sizes": dict(sizes=[20, 20, 20, 20], epochs=1, batch_size=5),
    "unequal_sizes": dict(sizes=[7, 23, 40, 1, 15], epochs=1, batch_size=10),
    "full_batch": dict(sizes=[7, 23, 40, 1, 15], epochs=1, batch_size=None),
    "several_epochs": dict(sizes=[7, 23, 12, 3], epochs=3, batch_size=4),
    "batch_larger_than_some_clients": dict(sizes=[3, 30, 12], epochs=2, batch_size=8),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    ("name", "method"),
    [("mlp", "vmap"), ("mlp", "linear_relu"), ("logistic", "vmap"), ("logistic", "linear_relu"),
     ("cnn", "vmap"), ("cnn", "auto")],
)  # fmt: skip
def test_vectorized_matches_sequential_local_update(name: str, method: str, case: str) -> None:
    spec = CASES[case]
    model = build_model(name, seed=0)
    assert_same_updates(
        model,
        make_data(spec["sizes"]),
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        method=method,
    )


def test_batch_plan_reproduces_batch_indices_per_client() -> None:
    sizes, seeds, epochs, batch_size = [7, 23, 1], [5, 6, 7], 2, 5
    index, mask = batch_plan(sizes, epochs=epochs, batch_size=batch_size, seeds=seeds)
    assert index.shape == mask.shape == (3, 2 * 5, 5)  # 23 samples: 5 batches per epoch; b_max = 5
    _assert_plan_is_batch_indices(index, mask, sizes, seeds, epochs, batch_size)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_plan_matches_batch_indices_in_every_case(case: str) -> None:
    spec = CASES[case]
    seeds = [11 * c + 3 for c in range(len(spec["sizes"]))]
    index, mask = batch_plan(
        spec["sizes"], epochs=spec["epochs"], batch_size=spec["batch_size"], seeds=seeds
    )
    _assert_plan_is_batch_indices(
        index, mask, spec["sizes"], seeds, spec["epochs"], spec["batch_size"]
    )


def _assert_plan_is_batch_indices(index, mask, sizes, seeds, epochs, batch_size) -> None:
    longest = widest = 0
    for c, (n, seed) in enumerate(zip(sizes, seeds, strict=True)):
        gen = torch.Generator().manual_seed(seed)
        want = [idx for _ in range(epochs) for idx in batch_indices(n, batch_size, gen)]
        for s in range(index.shape[1]):
            real = index[c, s][mask[c, s]]
            expected = want[s] if s < len(want) else torch.empty(0, dtype=torch.long)
            assert torch.equal(real, expected), f"client {c} step {s}"
            assert mask[c, s].sum() == len(expected)
        longest = max(longest, len(want))
        widest = max([widest, *(len(batch) for batch in want)])
    assert index.shape[1] == longest  # S: the most steps any client takes
    assert index.shape[2] == widest  # b_max: the widest batch


def test_client_whose_batches_ran_out_keeps_its_weights_on_padded_steps() -> None:
    model = build_model("mlp", seed=0)
    global_state = clone_state(model.state_dict())
    data = make_data([3, 50])  # batch 5: client 0 takes 1 step, client 1 takes 10
    states, losses = vectorized_local_updates(
        model, global_state, data, epochs=1, batch_size=5, lr=0.1, seeds=[1, 2]
    )
    # Independent computation of client 0's one step: full-batch gradient of the mean loss by autograd.
    x, y = data[0]
    model.load_state_dict(global_state)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (key, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(states[0][key], p.detach() - 0.1 * g, atol=ATOL, rtol=0)
    assert losses[0] == pytest.approx(float(loss.detach()), abs=ATOL)


def test_single_client_and_zero_epochs() -> (
    None
):  # zero epochs: vectorized only (TrainConfig needs 1)
    model = build_model("logistic", seed=0)
    assert_same_updates(model, make_data([9]), epochs=2, batch_size=4)
    global_state = clone_state(model.state_dict())
    states, losses = vectorized_local_updates(
        model, global_state, make_data([9, 4]), epochs=0, batch_size=4, lr=0.1, seeds=[0, 1]
    )
    for state in states:
        for key in global_state:
            assert torch.equal(state[key], global_state[key])
    assert losses == [0.0, 0.0]


def test_no_clients_gives_no_updates() -> None:
    model = build_model("mlp", seed=0)
    assert vectorized_local_updates(
        model, model.state_dict(), [], epochs=1, batch_size=10, lr=0.1, seeds=[]
    ) == ([], [])


class ScaledMLP(nn.Module):
    """A model with a constant buffer, a frozen layer and an integer buffer: none of them trained."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(40, 16)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 10)
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("version", torch.tensor(3, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.frozen(x)) * self.scale)


def test_buffers_and_frozen_parameters_are_copied_unchanged() -> None:
    torch.manual_seed(0)
    model = ScaledMLP()
    assert_same_updates(model, make_data([6, 13]), epochs=2, batch_size=4)
    global_state = clone_state(model.state_dict())
    states, _ = vectorized_local_updates(
        model, global_state, make_data([6, 13]), epochs=1, batch_size=4, lr=0.1, seeds=[0, 1]
    )
    for state in states:
        for key in ("scale", "version", "frozen.weight", "frozen.bias"):
            assert (
                torch.equal(state[key], global_state[key])
                and state[key].dtype == global_state[key].dtype
            )


def test_model_weights_are_left_unchanged() -> None:
    model = build_model("mlp", seed=0)
    before = clone_state(model.state_dict())
    global_state = {k: v + 0.01 for k, v in before.items()}
    vectorized_local_updates(
        model, global_state, make_data([5, 8]), epochs=1, batch_size=4, lr=0.1, seeds=[0, 1]
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_simulation_vectorized_matches_sequential_after_two_rounds() -> None:
    data = make_data([5, 12, 30, 8, 19, 40], seed=1)
    clients = [DataClient(x, y) for x, y in data]
    test = make_data([50], seed=2)[0]
    runs = {}
    for flag in (False, True):
        config = FedAvgConfig(
            num_rounds=2, fraction_train=0.5, local_epochs=2, batch_size=4, lr=0.1, vectorized=flag
        )
        sim = FedAvgSimulation(build_model("mlp", seed=0), clients, test, config)
        sim.run(progress=False)
        runs[flag] = sim
    ref, vec = runs[False], runs[True]
    for key, value in ref.global_state.items():
        torch.testing.assert_close(vec.global_state[key], value, atol=ATOL, rtol=0)
    assert vec.history.column("clients") == ref.history.column("clients")
    assert vec.history.column("train_loss") == pytest.approx(
        ref.history.column("train_loss"), abs=ATOL
    )
    assert vec.history.column("accuracy") == ref.history.column("accuracy")


def test_mismatched_data_and_seeds_raise() -> None:
    model = build_model("mlp", seed=0)
    with pytest.raises(ValueError, match="2 clients but 3 seeds"):
        vectorized_local_updates(
            model,
            model.state_dict(),
            make_data([4, 4]),
            epochs=1,
            batch_size=2,
            lr=0.1,
            seeds=[0, 1, 2],
        )


def test_empty_client_raises() -> None:
    model = build_model("mlp", seed=0)
    data = [*make_data([4]), (torch.zeros(0, 40), torch.zeros(0, dtype=torch.long))]
    with pytest.raises(ValueError, match="client 1 has no samples"):
        vectorized_local_updates(
            model, model.state_dict(), data, epochs=1, batch_size=2, lr=0.1, seeds=[0, 1]
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            [(torch.randn(4, 40), torch.zeros(3, dtype=torch.long))],
            "client 0 has 4 inputs but 3 labels",
        ),
        (
            [*make_data([4]), (torch.randn(4, 39), torch.zeros(4, dtype=torch.long))],
            r"client 1 has samples of shape \(39,\)",
        ),
        (
            [(torch.randn(4, 40), torch.zeros(4, 1, dtype=torch.long))],
            r"labels have shape \(4, 1\)",
        ),
    ],
)
def test_inconsistent_client_data_raises(data, message: str) -> None:
    model = build_model("mlp", seed=0)
    seeds = list(range(len(data)))
    with pytest.raises(ValueError, match=message):
        vectorized_local_updates(
            model, model.state_dict(), data, epochs=1, batch_size=2, lr=0.1, seeds=seeds
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_size": 0}, "batch_size"), ({"epochs": -1}, "epochs"), ({"lr": float("nan")}, "lr")],
)
def test_bad_hyperparameters_raise(kwargs: dict, message: str) -> None:
    model = build_model("mlp", seed=0)
    args = {"epochs": 1, "batch_size": 2, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        vectorized_local_updates(model, model.state_dict(), make_data([4]), seeds=[0], **args)


def test_batchnorm_model_raises() -> None:
    model = nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="'1' is a BatchNorm1d.*without running-stat buffers"):
        vectorized_local_updates(
            model, model.state_dict(), make_data([4]), epochs=1, batch_size=2, lr=0.1, seeds=[0]
        )


def test_dropout_model_raises() -> None:
    model = nn.Sequential(nn.Linear(40, 16), nn.Dropout(0.5), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="Dropout"):
        vectorized_local_updates(
            model, model.state_dict(), make_data([4]), epochs=1, batch_size=2, lr=0.1, seeds=[0]
        )


def test_global_state_missing_a_key_raises() -> None:
    model = build_model("mlp", seed=0)
    state = {k: v for k, v in model.state_dict().items() if k != "fc3.bias"}
    with pytest.raises(ValueError, match="fc3.bias"):
        vectorized_local_updates(
            model, state, make_data([4]), epochs=1, batch_size=2, lr=0.1, seeds=[0]
        )


# ------------------------------------------------------------------- which clients are vectorized
def _federation(sizes=(12, 20, 7, 15), seed=3):
    data = make_data(list(sizes), seed=seed)
    return data, make_data([40], seed=seed + 1)[0]


def _run(clients, vectorized, rounds=2):
    config = FedAvgConfig(
        num_rounds=rounds, fraction_train=1.0, batch_size=5, lr=0.1, vectorized=vectorized
    )
    sim = FedAvgSimulation(build_model("mlp", seed=0), clients, None, config)
    sim.run(progress=False)
    return sim


def _counting(kind, calls):
    """A DataClient with one hook set that counts its calls (and otherwise trains as plain)."""

    def loss_fn(model, xb, yb):
        calls.append(kind)
        return torch.nn.functional.cross_entropy(model(xb), yb)

    def penalty(model):
        calls.append(kind)
        return torch.zeros(())

    def grad_hook(model):
        calls.append(kind)

    def batch_sampler(n, generator):
        calls.append(kind)
        return batch_indices(n, 5, generator)

    def hooks_for_round(ctx, global_state):
        calls.append(kind)
        return {}

    return {
        "loss_fn": loss_fn,
        "penalty": penalty,
        "grad_hook": grad_hook,
        "batch_sampler": batch_sampler,
        "hooks_for_round": hooks_for_round,
    }[kind]


@pytest.mark.parametrize(
    "kind", ["loss_fn", "penalty", "grad_hook", "batch_sampler", "hooks_for_round"]
)
def test_a_data_client_with_a_hook_is_not_vectorized_and_its_hook_runs(kind) -> None:
    data, _ = _federation()
    calls: list[str] = []
    hooked = DataClient(*data[1], **{kind: _counting(kind, calls)})
    clients = [DataClient(*data[0]), hooked, *[DataClient(x, y) for x, y in data[2:]]]
    vec = _run(clients, vectorized=True)
    assert calls and set(calls) == {kind}
    n_vec = len(calls)
    calls.clear()
    seq = _run(clients, vectorized=False)
    assert len(calls) == n_vec  # the hook ran exactly as often as in the sequential run
    # the hooks here leave the objective unchanged, so both runs agree
    for key, value in seq.global_state.items():
        torch.testing.assert_close(vec.global_state[key], value, atol=ATOL, rtol=0)


def test_a_subclass_overriding_fit_is_not_vectorized() -> None:
    data, _ = _federation()
    fits = []

    class Scaled(DataClient):
        def fit(self, model, global_state, ctx, config):
            fits.append(ctx.client_id)
            reply = super().fit(model, global_state, ctx, config)
            return FitReply({k: v * 0.5 for k, v in reply.state.items()}, 1, reply.metrics)

    clients = [Scaled(*data[0]), *[DataClient(x, y) for x, y in data[1:]]]
    vec, seq = _run(clients, vectorized=True), _run(clients, vectorized=False)
    assert fits == [0, 0, 0, 0]  # two rounds in each run
    for key, value in seq.global_state.items():
        torch.testing.assert_close(vec.global_state[key], value, atol=ATOL, rtol=0)


def test_a_changed_objective_gives_a_different_model_than_the_vectorized_plain_one() -> None:
    # the hooked client really trains its own objective in vectorized mode (not the plain one)
    data, _ = _federation()

    def scaled_loss(model, xb, yb):
        return 10.0 * torch.nn.functional.cross_entropy(model(xb), yb)

    plain = [DataClient(x, y) for x, y in data]
    hooked = [DataClient(*data[0], loss_fn=scaled_loss), *plain[1:]]
    vec_hooked, seq_hooked = _run(hooked, True, rounds=1), _run(hooked, False, rounds=1)
    vec_plain = _run(plain, True, rounds=1)
    for key, value in seq_hooked.global_state.items():
        torch.testing.assert_close(vec_hooked.global_state[key], value, atol=ATOL, rtol=0)
    assert any(
        not torch.allclose(vec_hooked.global_state[k], vec_plain.global_state[k], atol=1e-3)
        for k in vec_plain.global_state
    )


def test_plain_clients_are_vectorized_and_match_the_sequential_run() -> None:
    data, _ = _federation(sizes=(5, 12, 30, 8, 19, 40))
    clients = [DataClient(x, y) for x, y in data]
    assert all(c.plain for c in clients)
    vec, seq = _run(clients, True), _run(clients, False)
    for key, value in seq.global_state.items():
        torch.testing.assert_close(vec.global_state[key], value, atol=ATOL, rtol=0)
    assert vec.history.column("train_loss") == pytest.approx(
        seq.history.column("train_loss"), abs=ATOL
    )


@pytest.mark.parametrize("name", ["mlp", "cnn", "logistic"])
def test_returned_states_are_contiguous_tensors_of_the_model_shapes(name: str) -> None:
    # the parameters are trained in their gradients' memory layout (transposed for linear
    # weights); what a client hands on must still be plain contiguous tensors
    model = build_model(name, seed=0)
    global_state = clone_state(model.state_dict())
    states, _ = vectorized_local_updates(
        model, global_state, make_data([12, 9]), epochs=1, batch_size=4, lr=0.1, seeds=[0, 1]
    )
    for state in states:
        for key, value in global_state.items():
            assert state[key].shape == value.shape and state[key].is_contiguous(), key
