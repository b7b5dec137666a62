"""What the notebooks run, as functions: clients from a partition, validation splits, rounds to a
target, and learning-rate search -- every choice made on a validation split, never on the test set.

STYLE.md's rule 7 (and the reason for this module): a learning rate or a round budget chosen by
looking at test accuracy makes the test accuracy an optimistic estimate. Here the training data is
split into *train* and *validation* (:func:`validation_split`); :func:`tune_lr` picks the learning
rate that reaches the target in the fewest rounds *on validation*, and :func:`rounds_to_target`
records validation and test accuracy side by side so a notebook reports test numbers for a choice
it made without them. ``labsupport.bench`` only measures; it calls these.

:func:`local_only` is the reference every FL curve stands beside (STYLE.md rule 6): each client
trains alone on its own data, from the same initial model, with no communication at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from labsupport.data import load_dataset
from labsupport.fl import DataClient, FedAvgConfig, FedAvgSimulation, History, client_seed
from labsupport.fl.vectorized import vectorized_local_updates
from labsupport.models import build_model
from labsupport.partitions import partition
from labsupport.train import evaluate

__all__ = [
    "RunToTarget",
    "clients_from_parts",
    "local_only",
    "mnist1d_clients",
    "rounds_to_target",
    "tune_lr",
    "validation_split",
]

Split = tuple[torch.Tensor, torch.Tensor]


def validation_split(
    x: torch.Tensor, y: torch.Tensor, fraction: float = 0.1, seed: int = 0
) -> tuple[Split, Split]:
    """Carve a random ``fraction`` of ``(x, y)`` out as validation: ``((x_tr, y_tr), (x_val, y_val))``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_val = max(1, round(fraction * len(y)))
    if n_val >= len(y):
        raise ValueError(f"{len(y)} samples are too few for a validation fraction of {fraction}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, tr = order[:n_val], order[n_val:]
    return (x[tr], y[tr]), (x[val], y[val])


def clients_from_parts(x: torch.Tensor, y: torch.Tensor, parts: Sequence) -> list[DataClient]:
    """One :class:`~labsupport.fl.DataClient` per index array of a partition."""
    return [DataClient(x[p], y[p]) for p in parts]


def mnist1d_clients(
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    *,
    num_samples: int = 5000,
    validation: float | None = None,
    **kwargs,
) -> tuple[list[DataClient], Split, Split | None]:
    """MNIST-1D over ``num_clients`` clients: ``(clients, test, validation or None)``.

    With ``validation=f`` a fraction ``f`` of the training set is held out first (the server's
    validation data for choices), and the rest is partitioned.
    """
    ds = load_dataset("mnist1d", num_samples=num_samples)
    x, y, val = ds.x_train, ds.y_train, None
    if validation is not None:
        (x, y), val = validation_split(x, y, validation, seed)
    parts = partition(y, num_clients, scheme, seed=seed, **kwargs)
    return clients_from_parts(x, y, parts), (ds.x_test, ds.y_test), val


@dataclass
class RunToTarget:
    """A run stopped at a target: rounds to it on validation (None if never) and the history,
    whose records carry ``extra["test_accuracy"]`` beside the validation ``accuracy``."""

    rounds: int | None
    history: History
    simulation: FedAvgSimulation
    stopped: str | None = None  # why the run ended before its rounds ran out without the target

    @property
    def test_accuracy(self) -> float | None:
        _, acc = self.history.evaluated("test_accuracy")
        return acc[-1] if acc else None


def rounds_to_target(
    clients: list[DataClient],
    validation: Split,
    cfg: FedAvgConfig,
    target: float,
    *,
    test: Split | None = None,
    model: str = "mlp",
    progress: bool = False,
    desc: str = "",
    give_up_after: int | None = 20,
) -> RunToTarget:
    """Run ``cfg`` until the global model's *validation* accuracy reaches ``target`` (or the rounds
    run out); with ``test``, every evaluated round also records test accuracy in ``extra``.

    A learning rate too large for the task makes every client diverge: each reply is rejected as
    non-finite, the global model is kept, and the next round diverges again from the same model.
    After ``give_up_after`` such rounds in a row (``None``: never) the run stops with ``rounds=None``
    and ``stopped`` saying why, instead of spending its remaining rounds (and a log line per client)
    on updates that can no longer change anything.
    """
    if give_up_after is not None and give_up_after < 1:
        raise ValueError(f"give_up_after must be >= 1 or None, got {give_up_after}")
    sim = FedAvgSimulation(build_model(model, seed=cfg.seed), clients, validation, cfg)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_rounds, desc=desc, disable=not progress)
    reached, stopped, all_rejected = None, None, 0
    while sim.round < cfg.num_rounds:
        last = sim.round + 1 == cfg.num_rounds
        record = sim.run_round(evaluate_now=True if last else None)
        bar.update(1)
        nobody = bool(record.rejected) and set(record.rejected) >= set(record.clients)
        all_rejected = all_rejected + 1 if nobody else 0
        if give_up_after is not None and all_rejected >= give_up_after:
            stopped = (
                f"every client was rejected in {all_rejected} rounds in a row (rounds "
                f"{record.round - all_rejected + 1}-{record.round}; e.g. "
                f"{next(iter(record.rejected.values()))}): the run diverged at lr={cfg.lr}"
            )
            break
        if record.accuracy is not None:
            if test is not None:
                record.extra["test_accuracy"] = evaluate(sim.global_model(), *test)["accuracy"]
            bar.set_postfix(val=f"{record.accuracy:.3f}")
            if record.accuracy >= target:
                reached = record.round
                break
    bar.close()
    return RunToTarget(reached, sim.history, sim, stopped)


def tune_lr(
    clients: list[DataClient],
    validation: Split,
    cfg: FedAvgConfig,
    lrs: Sequence[float],
    target: float,
    **kwargs,
) -> tuple[float | None, dict[float, RunToTarget]]:
    """The learning rate of ``lrs`` that reaches ``target`` on *validation* in the fewest rounds.

    Returns ``(best_lr or None if none reached it, {lr: run})``; ties go to the smaller rate.
    """
    runs = {
        lr: rounds_to_target(clients, validation, replace(cfg, lr=lr), target, **kwargs)
        for lr in lrs
    }
    reached = {lr: r.rounds for lr, r in runs.items() if r.rounds is not None}
    best = min(reached, key=lambda lr: (reached[lr], lr)) if reached else None
    return best, runs


def local_only(
    clients: Sequence[DataClient],
    splits: Mapping[str, Split],
    *,
    model: str = "mlp",
    epochs: int = 20,
    batch_size: int | None = 10,
    lr: float = 0.1,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Local-only training: every client trains alone, then each model is scored on every split.

    Client ``k`` runs ``epochs`` epochs of plain SGD (batch ``batch_size``, rate ``lr``) on its own
    ``(x, y)`` from ``build_model(model, seed=seed)``, its batch order seeded with
    ``client_seed(seed, 0, k)`` -- what :func:`~labsupport.fl.clients.local_update` would compute,
    for all clients at once (:func:`~labsupport.fl.vectorized.vectorized_local_updates`). Returns
    ``{split name: [accuracy of client 0's model, client 1's, ...]}`` (fractions in [0, 1]).
    """
    if len(clients) == 0:
        raise ValueError("local_only needs at least one client; got none")
    if not splits:
        raise ValueError("local_only needs at least one (x, y) split to score the models on")
    net = build_model(model, seed=seed)
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    states, _ = vectorized_local_updates(
        net,
        initial,
        [(c.x, c.y) for c in clients],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seeds=[client_seed(seed, 0, k) for k in range(len(clients))],
    )
    scores: dict[str, list[float]] = {name: [] for name in splits}
    for state in states:
        net.load_state_dict(state)
        for name, (x, y) in splits.items():
            scores[name].append(evaluate(net, x, y)["accuracy"])
    return scores
