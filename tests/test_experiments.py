"""labsupport.experiments: choices are made on validation, never on the test split.

The learning rate that `tune_lr` picks must not change when the test split changes: here a test
split whose labels are all wrong (so that choosing on it would pick nothing) leaves the choice
exactly as it is without any test split, and a spy shows the stopping rule only ever reads the
validation split. `local_only` is checked against a plain loop of `local_update`.
"""

from __future__ import annotations

import pytest
import torch

from labsupport import experiments
from labsupport.experiments import local_only, rounds_to_target, tune_lr, validation_split
from labsupport.fl import DataClient, FedAvgConfig, TrainConfig, client_seed, local_update
from labsupport.models import build_model
from labsupport.train import evaluate


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten well-separated Gaussian classes in 40 dimensions (the MLP's input size)."""
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(10, 40, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 10, (n,), generator=g)
    return centers[y] + torch.randn(n, 40, generator=g), y


@pytest.fixture(scope="module")
def federation():
    x, y = _blobs(300, seed=1)
    (x_tr, y_tr), val = validation_split(x, y, 0.2, seed=0)
    clients = [DataClient(x_tr[i::3], y_tr[i::3]) for i in range(3)]
    cfg = FedAvgConfig(num_rounds=4, fraction_train=1.0, local_epochs=1, batch_size=20, seed=0)
    return clients, val, cfg


def test_validation_split_is_a_disjoint_cover_of_the_data():
    x = torch.arange(50.0).reshape(50, 1)
    y = torch.arange(50)
    (x_tr, y_tr), (x_val, y_val) = validation_split(x, y, 0.1, seed=3)
    assert len(y_val) == 5 and len(y_tr) == 45
    assert sorted(y_tr.tolist() + y_val.tolist()) == list(range(50))
    assert torch.equal(x_tr[:, 0].long(), y_tr) and torch.equal(x_val[:, 0].long(), y_val)
    again = validation_split(x, y, 0.1, seed=3)[1][1]
    assert torch.equal(again, y_val)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_validation_split_rejects_a_fraction_outside_zero_one(fraction):
    with pytest.raises(ValueError, match="fraction"):
        validation_split(torch.zeros(10, 2), torch.zeros(10), fraction)


def test_tune_lr_choice_ignores_a_test_split_that_would_change_it(federation):
    clients, val, cfg = federation
    lrs, target = [0.005, 0.5], 0.9
    # A test split whose every label is wrong: a choice made on it would find no rate that works.
    poisoned = (val[0], (val[1] + 1) % 10)
    best_plain, runs_plain = tune_lr(clients, val, cfg, lrs, target)
    best, runs = tune_lr(clients, val, cfg, lrs, target, test=poisoned)
    assert best is not None, "the fixture should let some learning rate reach the target"
    assert best == best_plain
    assert {lr: r.rounds for lr, r in runs.items()} == {
        lr: r.rounds for lr, r in runs_plain.items()
    }
    # The test split was evaluated (and reported) -- chosen on, it would have picked nothing.
    by_test: dict[float, int | None] = {}
    for lr, r in runs.items():
        rounds, test_acc = r.history.evaluated("test_accuracy")
        assert rounds, f"lr={lr}: no test accuracy was recorded"
        by_test[lr] = next(
            (rd for rd, a in zip(rounds, test_acc, strict=True) if a >= target), None
        )
    assert all(v is None for v in by_test.values()), (
        "the poisoned test split should defeat every rate"
    )
    # The independent computation of the choice, from the validation accuracies alone.
    reached = {lr: r.history.rounds_to(target) for lr, r in runs.items()}
    reached = {lr: rd for lr, rd in reached.items() if rd is not None}
    assert best == min(reached, key=lambda lr: (reached[lr], lr))


def test_rounds_to_target_stops_on_validation_and_only_reports_test(federation, monkeypatch):
    clients, val, cfg = federation
    test = _blobs(100, seed=7)
    seen: list[str] = []
    real = experiments.evaluate

    def spy(model, x, y, *args, **kwargs):  # experiments.evaluate is the test-side call only
        seen.append("test" if x is test[0] else "validation" if x is val[0] else "other")
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(experiments, "evaluate", spy)
    run = rounds_to_target(clients, val, cfg, 0.95, test=test)
    assert seen and set(seen) == {"test"}
    # The stopping round is the first whose *validation* accuracy (the record's own) reached it.
    assert run.rounds == run.history.rounds_to(0.95)
    val_acc = evaluate(run.simulation.global_model(), *val)["accuracy"]
    assert run.history.rounds[-1].accuracy == pytest.approx(val_acc)


def test_local_only_matches_a_loop_of_local_updates():
    x, y = _blobs(90, seed=2)
    clients = [DataClient(x[:50], y[:50]), DataClient(x[50:], y[50:])]
    split = _blobs(60, seed=5)
    scores = local_only(clients, {"val": split}, epochs=2, batch_size=16, lr=0.1, seed=4)
    init = build_model("mlp", seed=4).state_dict()
    config = TrainConfig(local_epochs=2, batch_size=16, lr=0.1)
    expected = []
    for k, c in enumerate(clients):
        model = build_model("mlp")
        state, _ = local_update(model, init, c.x, c.y, config, seed=client_seed(4, 0, k))
        model.load_state_dict(state)
        expected.append(evaluate(model, *split)["accuracy"])
    assert scores["val"] == pytest.approx(expected, abs=1 / 60 + 1e-9)


def test_local_only_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one client"):
        local_only([], {"val": _blobs(10, 0)})
    with pytest.raises(ValueError, match="split"):
        local_only([DataClient(*_blobs(10, 0))], {})


def test_a_diverged_run_gives_up_instead_of_running_out_its_rounds(federation, caplog):
    clients, val, cfg = federation
    from dataclasses import replace

    cfg = replace(cfg, num_rounds=50, lr=1e12)  # every local update overflows to inf/NaN
    run = rounds_to_target(clients, val, cfg, 0.9, give_up_after=3)
    assert run.rounds is None and len(run.history) == 3
    assert all(set(r.rejected) == set(r.clients) for r in run.history.rounds)
    assert "3 rounds in a row" in run.stopped and "lr=1000000000000.0" in run.stopped
    assert "non-finite" in run.stopped  # the clients' own rejection reason is kept
    # a run that never diverges is not stopped, whatever give_up_after says
    fine = rounds_to_target(clients, val, replace(cfg, num_rounds=3, lr=0.05), 1.1, give_up_after=1)
    assert fine.stopped is None and len(fine.history) == 3
    with pytest.raises(ValueError, match="give_up_after"):
        rounds_to_target(clients, val, cfg, 0.9, give_up_after=0)
