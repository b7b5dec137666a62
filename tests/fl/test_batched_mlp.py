"""The vectorized clients' written-out Linear/ReLU path: which models take it, and that it computes
what the sequential ``local_update`` (autograd, torch.optim.SGD) computes -- including for models it
must not take, which fall back to ``vmap`` and still match."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vectorized_testlib import assert_same_updates, make_data

from labsupport.fl.batched_mlp import LinearReLUChain, linear_relu_chain
from labsupport.fl.state import clone_state
from labsupport.fl.vectorized import vectorized_local_updates
from labsupport.models import build_model


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(40, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class MethodReLU(FunctionalReLU):
    def forward(self, x):
        return self.b(self.a(x.flatten(1)).relu())


class Tanh(FunctionalReLU):
    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


class ReusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


class Branching(FunctionalReLU):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            return self.b(torch.relu(self.a(x)))
        return self.b(self.a(x))


class ScaledLogits(FunctionalReLU):
    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * 2.0


@pytest.mark.parametrize(
    ("model", "chain"),
    [
        (build_model("mlp", seed=0), LinearReLUChain(True, ("fc1", "fc2", "fc3"), (True, True, False))),
        (build_model("logistic", seed=0), LinearReLUChain(True, ("1",), (False,))),
        (nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10)),
         LinearReLUChain(False, ("0", "2"), (True, False))),
        (nn.Sequential(nn.Linear(40, 16), nn.Linear(16, 10)), LinearReLUChain(False, ("0", "1"), (False, False))),
        (FunctionalReLU(), LinearReLUChain(False, ("a", "b"), (True, False))),
        (MethodReLU(), LinearReLUChain(True, ("a", "b"), (True, False))),
    ],
)  # fmt: skip
def test_chains_of_linear_and_relu_are_recognised_from_the_traced_graph(model, chain):
    assert linear_relu_chain(model) == chain


@pytest.mark.parametrize(
    "model",
    [
        build_model("cnn", seed=0),
        Tanh(),
        Residual(),
        ReusedLayer(),
        Branching(),
        ScaledLogits(),
        nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU()),  # ReLU'd logits
        nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.ReLU(), nn.Linear(16, 10)),
        nn.Sequential(nn.Linear(40, 16), nn.LeakyReLU(), nn.Linear(16, 10)),
        nn.Sequential(nn.Flatten(0), nn.Linear(40, 10)),  # flattens the batch dimension too
        nn.Sequential(nn.Linear(40, 16), nn.GroupNorm(4, 16), nn.Linear(16, 10)),
    ],
    ids=lambda m: type(m).__name__ + str(len(list(m.children()))),
)
def test_anything_else_is_not_a_chain(model):
    assert linear_relu_chain(model) is None


@pytest.mark.parametrize(
    "model", [Tanh(), Residual(), ReusedLayer(), ScaledLogits(), build_model("cnn", seed=0)]
)
def test_other_models_take_the_vmap_path_and_still_match_the_sequential_run(model):
    assert_same_updates(model, make_data([7, 23, 12]), epochs=2, batch_size=5)
    with pytest.raises(ValueError, match="not a chain of nn.Linear and ReLU"):
        assert_same_updates(model, make_data([7]), epochs=1, batch_size=5, method="linear_relu")


def test_a_chain_without_biases_and_in_float64_matches_the_sequential_run():
    model = nn.Sequential(nn.Linear(40, 16, bias=False), nn.ReLU(), nn.Linear(16, 10)).double()
    data = [(x.double(), y) for x, y in make_data([7, 23, 12])]
    assert_same_updates(model, data, epochs=2, batch_size=5, method="linear_relu")


def test_a_frozen_layer_is_not_trained_by_the_written_out_path():
    model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="not exactly the chain's weights and biases"):
        assert_same_updates(model, make_data([7]), epochs=1, batch_size=5, method="linear_relu")
    assert_same_updates(model, make_data([7, 23, 12]), epochs=2, batch_size=5)  # auto: vmap


def test_a_forward_hook_is_honoured_by_falling_back_to_vmap():
    model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    model[0].register_forward_hook(lambda module, args, out: out * 3.0)
    with pytest.raises(ValueError, match="forward hooks"):
        assert_same_updates(model, make_data([7]), epochs=1, batch_size=5, method="linear_relu")
    assert_same_updates(model, make_data([7, 23, 12]), epochs=2, batch_size=5)


def test_inputs_that_do_not_fit_the_first_layer_are_not_reshaped():
    model = nn.Sequential(nn.Linear(40, 10))  # no flatten: (n, 2, 20) is not (n, 40)
    data = [(torch.randn(6, 2, 20), torch.randint(0, 10, (6,)))]
    state = clone_state(model.state_dict())
    with pytest.raises(ValueError, match="do not fit the first layer"):
        vectorized_local_updates(
            model, state, data, epochs=1, batch_size=3, lr=0.1, seeds=[0], method="linear_relu"
        )


def test_unknown_method_is_refused():
    model = build_model("mlp", seed=0)
    with pytest.raises(ValueError, match="method must be 'auto', 'vmap' or 'linear_relu'"):
        vectorized_local_updates(
            model, clone_state(model.state_dict()), make_data([5]), epochs=1, batch_size=5,
            lr=0.1, seeds=[0], method="fast",
        )  # fmt: skip


def test_both_paths_give_the_same_models_for_a_hundred_clients_of_unequal_sizes():
    model = build_model("mlp", seed=0)
    state = clone_state(model.state_dict())
    data = make_data(
        [int(n) for n in torch.randint(1, 60, (100,), generator=torch.Generator().manual_seed(3))]
    )
    kwargs = dict(epochs=2, batch_size=10, lr=0.05, seeds=list(range(100)))
    fast, fast_loss = vectorized_local_updates(model, state, data, method="linear_relu", **kwargs)
    slow, slow_loss = vectorized_local_updates(model, state, data, method="vmap", **kwargs)
    for a, b in zip(fast, slow, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
            assert a[k].is_contiguous()
    assert fast_loss == pytest.approx(slow_loss, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_labels_other_than_int64_get_exactly_what_the_sequential_run_gives(dtype):
    """int32 labels: cross_entropy refuses them, so both the loop and vectorized mode must; uint8
    ones it accepts, and both must train the same."""
    model = build_model("mlp", seed=0)
    data = [(x, y.to(dtype)) for x, y in make_data([7, 12])]
    if dtype == torch.int32:
        with pytest.raises(RuntimeError, match="Long or Byte"):
            assert_same_updates(model, data, epochs=1, batch_size=5)
    else:
        assert_same_updates(model, data, epochs=1, batch_size=5)
    with pytest.raises(ValueError, match="not int64 class indices"):
        assert_same_updates(model, data, epochs=1, batch_size=5, method="linear_relu")


def test_a_global_forward_hook_is_honoured_by_falling_back_to_vmap():
    model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: out * 2.0)
    try:
        assert_same_updates(model, make_data([7, 12]), epochs=1, batch_size=5)
    finally:
        handle.remove()
