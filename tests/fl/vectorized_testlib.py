"""Helpers shared by the vectorized-clients tests (``test_vectorized``, ``test_batched_mlp``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labsupport.fl.clients import TrainConfig, local_update
from labsupport.fl.state import clone_state
from labsupport.fl.vectorized import vectorized_local_updates

ATOL = 1e-5


def make_data(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic clients: ``n`` samples of shape (40,) with labels in 10 classes each."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes
    ]


def sequential(model, global_state, data, *, epochs, batch_size, lr, seeds):
    """The reference: one ``local_update`` per client, in a loop."""
    states, losses = [], []
    for (x, y), seed in zip(data, seeds, strict=True):
        config = TrainConfig(local_epochs=epochs, batch_size=batch_size, lr=lr, optimizer="sgd")
        state, result = local_update(model, global_state, x, y, config, seed=seed)
        states.append(state)
        losses.append(result.loss)
    return states, losses


def assert_same_updates(
    model: nn.Module,
    data,
    *,
    epochs: int,
    batch_size: int | None,
    lr: float = 0.1,
    method: str = "auto",
) -> None:
    global_state = clone_state(model.state_dict())
    seeds = [100 + 7 * i for i in range(len(data))]
    got_states, got_losses = vectorized_local_updates(
        model,
        global_state,
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seeds=seeds,
        method=method,
    )
    want_states, want_losses = sequential(
        model, global_state, data, epochs=epochs, batch_size=batch_size, lr=lr, seeds=seeds
    )
    assert len(got_states) == len(want_states) == len(data)
    for c, (got, want) in enumerate(zip(got_states, want_states, strict=True)):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype
            torch.testing.assert_close(
                got[key], want[key], atol=ATOL, rtol=0, msg=f"client {c} {key}"
            )
        assert any(not torch.equal(got[k], global_state[k]) for k in got), (
            f"client {c} did not train"
        )
    assert got_losses == pytest.approx(want_losses, abs=ATOL)
